"""Florence-2 multimodal BART encoder (SPEC §3) and the BART attention shared with the BART decoder.

Input is [image tokens ; prompt token embeddings]; learned positions (offset 2) run over the whole
concatenation; `layernorm_embedding`; post-LN layers with exact GELU; no embedding scaling.

Shape legend: B batch, L sequence length (image tokens + prompt), d width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import EncoderConfig
from .modules import Layout, attend


class BartAttention(nn.Module):
    """Multi-head attention with biases (q, k, v, out_proj); self- or cross-attention."""

    def __init__(self, d: int, heads: int, d_kv: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.scale = (d // heads) ** -0.5
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d_kv or d, d)
        self.v_proj = nn.Linear(d_kv or d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x_BLd, layout: Layout, kv_BSd=None, kv_layout: Layout | None = None, causal=False,
                projected_kv=None):
        """`projected_kv`: (k, v) already projected from kv_BSd (the decoder's all-layer cross K/V GEMM)."""
        kv = x_BLd if kv_BSd is None else kv_BSd
        k, v = projected_kv if projected_kv is not None else (self.k_proj(kv), self.v_proj(kv))
        out = attend(
            self.q_proj(x_BLd), k, v, heads=self.heads, kv_heads=self.heads,
            q_layout=layout, k_layout=kv_layout or layout, scale=self.scale, causal=causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out)

    def step(self, x_N1d, cache, pos):
        """Cached causal self-attention of one new token per row (generation; no dropout)."""
        from .modules import attend_cached

        out = attend_cached(self.q_proj(x_N1d), self.k_proj(x_N1d), self.v_proj(x_N1d), cache, pos,
                            heads=self.heads, kv_heads=self.heads, scale=self.scale)
        return self.out_proj(out)


class LearnedPositions(nn.Embedding):
    """BART's learned positions: row p + 2 holds position p."""

    OFFSET = 2

    def __init__(self, max_positions: int, d: int):
        super().__init__(max_positions + self.OFFSET, d)

    def forward(self, positions_BL, bound: int | None = None, checked: bool = False):  # type: ignore[override]
        """`bound`: 1 + the largest position, known on the host (a Python int: the check reads no tensor);
        `checked`: the positions were checked at collation (packing.check_limits), no check here. Otherwise
        the positions are read: on CPU a ValueError, on a device torch._assert_async (no host sync)."""
        table = self.num_embeddings - self.OFFSET
        if checked:
            pass
        elif bound is not None:
            if bound > table:
                raise ValueError(f"sequence of {bound} positions exceeds the {table} learned positions")
        elif positions_BL.device.type == "cpu":
            if positions_BL.numel() and int(positions_BL.max()) >= table:
                raise ValueError(f"sequence of {int(positions_BL.max()) + 1} positions exceeds the {table} "
                                 f"learned positions")
        else:
            torch._assert_async((positions_BL < table).all(), f"positions exceed the {table} learned positions")
        return super().forward(positions_BL + self.OFFSET)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.self_attn = BartAttention(cfg.d_model, cfg.heads, dropout=cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x, layout: Layout):
        h = ops.dropout(self.self_attn(x, layout), self.dropout, self.training)
        x = self.self_attn_layer_norm(x + h)
        h = ops.dropout(F.gelu(self.fc1(x)), self.dropout, self.training)  # activation dropout
        h = ops.dropout(self.fc2(h), self.dropout, self.training)
        return self.final_layer_norm(x + h)


class BartStack(nn.Module):
    """What the BART encoder and decoder share: token table, learned positions, `layernorm_embedding`."""

    def __init__(self, vocab_size: int, d: int, max_positions: int, eps: float, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.embed_tokens = nn.Embedding(vocab_size, d)
        self.embed_positions = LearnedPositions(max_positions, d)
        self.layernorm_embedding = nn.LayerNorm(d, eps=eps)

    def add_positions(self, x_BLd: torch.Tensor, layout: Layout) -> torch.Tensor:
        L = x_BLd.shape[1]
        pos = self.embed_positions(layout.positions(L, x_BLd.device), bound=layout.position_bound(L),
                                   checked=layout.positions_checked)
        x = self.layernorm_embedding(x_BLd + pos.to(x_BLd.dtype))
        return ops.dropout(x, self.dropout, self.training)


class Encoder(BartStack):
    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg.vocab_size, cfg.d_model, cfg.max_positions, cfg.layer_norm_eps, cfg.dropout)
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))

    def forward(self, inputs_BLd: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Run the encoder over already-embedded tokens (image tokens + prompt embeddings)."""
        x = self.add_positions(inputs_BLd, layout)
        for layer in self.layers:
            x = layer(x, layout)
        return x
