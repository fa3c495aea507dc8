"""Gemma-2 decoder with tanh-gated cross-attention in every layer (SPEC §4).

Layer, exact order:
    h = x + post_attention_layernorm(self_attn(input_layernorm(x)))          RoPE, GQA, softcap, causal (+window)
    h = h + tanh(gate) * post_encoder_attention_layernorm(encoder_attn(h, enc))   no pre-norm, no RoPE
    h = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))
Sliding-window layers are the even indices (0, 2, ...). With every gate at 0 the decoder equals Gemma-2.

Shape legend: B batch, L decoder length, S encoder length, d hidden, H heads, Hk kv heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .config import DecoderConfig
from .modules import Layout, attend


class RMSNorm(nn.Module):
    """Gemma RMSNorm: fp32 math, x * rsqrt(mean(x^2) + eps) * (1 + w), then cast back (w initialised to 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def add(self, residual, y, scale=None, next_norm: "RMSNorm | None" = None):
        """(residual + scale * self(y), next_norm(that) or None): one fused kernel on the triton backend."""
        return ops.add_rms_norm(residual, y, self.weight, self.eps, scale=scale,
                                next_weight=None if next_norm is None else next_norm.weight,
                                next_eps=None if next_norm is None else next_norm.eps)


class Rotary(nn.Module):
    """RoPE on (B, H, L, D) q and k, rotate-half convention, angles in fp32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # built on the CPU explicitly: this buffer is in no checkpoint, so it must be real even on a meta model
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta ** exponent)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions_BL: torch.Tensor, dtype: torch.dtype):
        angles = positions_BL[..., None].float() * self.inv_freq.float()
        emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def rotate(q, k, cos, sin):
        return ops.rope(q, k, cos, sin)  # rotate-half; in place on the triton backend


class GemmaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, d_kv: int | None = None):
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, H * D, bias=False)
        self.k_proj = nn.Linear(d_kv or cfg.hidden, Hk * D, bias=False)
        self.v_proj = nn.Linear(d_kv or cfg.hidden, Hk * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.hidden, bias=False)

    def forward(self, x_BLd, layout: Layout, kv_BSd=None, kv_layout=None, causal=False, window=None, rope=None):
        kv = x_BLd if kv_BSd is None else kv_BSd
        out = attend(
            self.q_proj(x_BLd), self.k_proj(kv), self.v_proj(kv), heads=self.cfg.heads,
            kv_heads=self.cfg.kv_heads, q_layout=layout, k_layout=kv_layout or layout, rope=rope,
            scale=self.cfg.query_pre_attn_scalar ** -0.5, softcap=self.cfg.attn_softcap, causal=causal,
            window=window,
        )
        return self.o_proj(out)


class GeGLU(nn.Module):
    def __init__(self, d: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.window = cfg.sliding_window if index % 2 == 0 and cfg.sliding_window else None
        norm = lambda: RMSNorm(cfg.hidden, cfg.rms_eps)  # noqa: E731
        self.self_attn = GemmaAttention(cfg)
        self.encoder_attn = GemmaAttention(cfg, d_kv=cfg.encoder_width)
        self.encoder_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GeGLU(cfg.hidden, cfg.ffn)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_encoder_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, x, layout: Layout, enc_BSd, enc_layout: Layout, rope):
        # residual adds fused with the norms around them (norm.add: h = residual + scale * norm(y) [, next norm])
        attn = self.self_attn(self.input_layernorm(x), layout, causal=True, window=self.window, rope=rope)
        h, _ = self.post_attention_layernorm.add(x, attn)
        cross = self.encoder_attn(h, layout, kv_BSd=enc_BSd, kv_layout=enc_layout)
        h, ff_in = self.post_encoder_attention_layernorm.add(
            h, cross, scale=torch.tanh(self.encoder_attn_gate).to(h.dtype), next_norm=self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm.add(h, self.mlp(ff_in))[0]


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, ids_BL: torch.Tensor, layout: Layout, enc_BSd: torch.Tensor, enc_layout: Layout):
        """Final hidden states (B, L, d) before the tied lm_head."""
        x = self.embed_tokens(ids_BL)
        # sqrt(hidden) rounded to the activation dtype first, as Gemma-2 does (matters in bf16)
        x = x * torch.tensor(self.cfg.hidden ** 0.5, dtype=x.dtype)
        cos, sin = self.rotary.cos_sin(layout.positions(ids_BL.shape[1], ids_BL.device), x.dtype)
        rope = lambda q, k: Rotary.rotate(q, k, cos, sin)  # noqa: E731
        for layer in self.layers:
            x = layer(x, layout, enc_BSd, enc_layout, rope)
        return self.norm(x)
