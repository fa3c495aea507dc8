"""Florence-2 BART decoder with the Gemma vocabulary (SPEC §5), for the florenz-0.4b / -1.0b presets.

Post-LN layers: causal self-attention, cross-attention to the encoder, exact-GELU MLP; learned positions with
offset 2, `layernorm_embedding`, no embedding scaling. The lm_head is tied to `embed_tokens` and the final
logit softcap of 30 is applied by the composition (florenz.py), as for the Gemma presets.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import DecoderConfig
from .encoder import BartAttention, BartStack
from .modules import KVCache, Layout, StepLayer, attend_cached, cross_attend_step, cross_heads, project_kv_all_layers


class BartDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d, eps = cfg.hidden, cfg.layer_norm_eps
        self.dropout = cfg.dropout
        self.self_attn = BartAttention(d, cfg.heads, dropout=cfg.dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.encoder_attn = BartAttention(d, cfg.heads, d_kv=cfg.encoder_width, dropout=cfg.dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, d)
        self.final_layer_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, layout: Layout, enc_BSd, enc_layout: Layout, cross_kv=None):
        drop = lambda t: ops.dropout(t, self.dropout, self.training)
        x = self.self_attn_layer_norm(x + drop(self.self_attn(x, layout, causal=True)))
        cross = self.encoder_attn(x, layout, enc_BSd, enc_layout, projected_kv=cross_kv)
        x = self.encoder_attn_layer_norm(x + drop(cross))
        h = drop(self.fc2(drop(F.gelu(self.fc1(x)))))
        return self.final_layer_norm(x + h)

    def step(self, x_N1d, cache: KVCache, pos, ctx: StepLayer, enc_layout: Layout, beams: int):
        """`forward` (eval mode) for one new token per row with the self-attention cache; the `beams` rows of
        image b query that image's one cross K/V together (see GemmaDecoderLayer.step; `ctx`: step_layers')."""
        a, e = self.self_attn, self.encoder_attn
        d = x_N1d.shape[-1]
        q, k, v = F.linear(x_N1d, ctx.w_qkv, ctx.b_qkv).split([d, d, d], -1)
        attn = a.out_proj(attend_cached(q, k, v, cache, pos, heads=a.heads, kv_heads=a.heads, scale=a.scale))
        x = self.self_attn_layer_norm(x_N1d + attn)
        cross = cross_attend_step(e.q_proj(x), ctx.cross_k, ctx.cross_v, enc_layout.mask, heads=e.heads, beams=beams,
                                  scale=e.scale)
        x = self.encoder_attn_layer_norm(x + e.out_proj(cross))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class BartDecoder(BartStack):
    def __init__(self, cfg: DecoderConfig):
        super().__init__(cfg.vocab_size, cfg.hidden, cfg.max_positions, cfg.layer_norm_eps, cfg.dropout)
        self.cfg = cfg
        self.layers = nn.ModuleList(BartDecoderLayer(cfg) for _ in range(cfg.layers))
        self.fuse_cross_kv = True  # as in GemmaDecoder

    def cross_kv(self, enc_BSd: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention (k, v), each (B, S, d), from one GEMM (also the generation cache)."""
        return project_kv_all_layers(enc_BSd, [layer.encoder_attn for layer in self.layers])

    def forward(self, ids_BL: torch.Tensor, layout: Layout, enc_BSd: torch.Tensor, enc_layout: Layout):
        x = self.add_positions(self.embed_tokens(ids_BL), layout)
        cross = self.cross_kv(enc_BSd) if self.fuse_cross_kv else [None] * len(self.layers)
        for layer, kv in zip(self.layers, cross):
            x = layer(x, layout, enc_BSd, enc_layout, cross_kv=kv)
        return x

    def allocate_cache(self, n: int, max_len: int, dtype, device) -> list[KVCache]:
        c = self.cfg
        return [KVCache.allocate(n, c.heads, max_len, c.hidden // c.heads, dtype, device) for _ in self.layers]

    def step_layers(self, cross) -> list[StepLayer]:
        """The step context of every layer (modules.StepLayer) from its cross (k, v) (B, S, d): once per generation."""
        out = []
        for layer, (k, v) in zip(self.layers, cross):
            a = layer.self_attn
            out.append(StepLayer(cross_k=cross_heads(k, a.heads), cross_v=cross_heads(v, a.heads),
                                 w_qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                                 b_qkv=torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])))
        return out

    def step(self, ids_N: torch.Tensor, pos: torch.Tensor, caches: list[KVCache], cross, enc_layout: Layout,
             beams: int) -> torch.Tensor:
        """Hidden states (N, 1, d) of one new token per row at position `pos` (int64 tensor, 0-dim for every row or
        (N,) one per row; the caller checks it against the position table: indexing here would need a host sync).
        `cross`: step_layers' context (or the cross_kv pairs, turned into it here, once per call)."""
        if enc_layout.packed:
            raise ValueError("the cached decode step takes a padded encoder layout (B, S), not a packed one")
        if cross and not isinstance(cross[0], StepLayer):
            cross = self.step_layers(cross)
        x = self.embed_tokens(ids_N[:, None])
        where = self.embed_positions.weight[pos + self.embed_positions.OFFSET].view(-1, 1, x.shape[-1])  # (1|N, 1, d)
        x = self.layernorm_embedding(x + where.to(x.dtype))
        for layer, cache, ctx in zip(self.layers, caches, cross):
            x = layer.step(x, cache, pos, ctx, enc_layout, beams)
        return x
