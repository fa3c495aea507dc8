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
import torch.nn.functional as F

from . import ops
from .config import DecoderConfig
from .modules import (
    KVCache,
    Layout,
    StepLayer,
    attend,
    attend_cached,
    cross_attend_step,
    cross_heads,
    project_kv_all_layers,
)


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


def _norm(norm: RMSNorm, w1, x):
    """norm(x); with w1 = 1 + norm.weight given (the CPU step, fp32 / fp64): the reference's math in 5 ops, not ~10
    (no dtype casts, no dispatch, 1 + w made once per generation)."""
    return norm(x) if w1 is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * w1


def _add_norm(norm: RMSNorm, w1, residual, y, scale=None, next_norm: RMSNorm | None = None, next_w1=None):
    """norm.add(residual, y, scale, next_norm), through _norm when w1 is given."""
    if w1 is None:
        return norm.add(residual, y, scale=scale, next_norm=next_norm)
    n = _norm(norm, w1, y)
    h = residual + (n if scale is None else scale * n)
    return h, None if next_norm is None else _norm(next_norm, next_w1, h)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, d_kv: int | None = None):
        super().__init__()
        self.cfg = cfg
        H, Hk, D = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, H * D, bias=False)
        self.k_proj = nn.Linear(d_kv or cfg.hidden, Hk * D, bias=False)
        self.v_proj = nn.Linear(d_kv or cfg.hidden, Hk * D, bias=False)
        self.o_proj = nn.Linear(H * D, cfg.hidden, bias=False)

    def forward(self, x_BLd, layout: Layout, kv_BSd=None, kv_layout=None, causal=False, window=None, rope=None,
                projected_kv=None):
        """`projected_kv`: (k, v) already projected from kv_BSd (the decoder's all-layer cross K/V GEMM)."""
        kv = x_BLd if kv_BSd is None else kv_BSd
        k, v = projected_kv if projected_kv is not None else (self.k_proj(kv), self.v_proj(kv))
        out = attend(
            self.q_proj(x_BLd), k, v, heads=self.cfg.heads,
            kv_heads=self.cfg.kv_heads, q_layout=layout, k_layout=kv_layout or layout, rope=rope,
            scale=self.cfg.query_pre_attn_scalar ** -0.5, softcap=self.cfg.attn_softcap, causal=causal,
            window=window,
        )
        return self.o_proj(out)

    def step(self, x_N1d, cache: KVCache, pos, rope):
        """Cached self-attention of one new token per row (generation); fills `cache` at `pos`."""
        out = attend_cached(
            self.q_proj(x_N1d), self.k_proj(x_N1d), self.v_proj(x_N1d), cache, pos, heads=self.cfg.heads,
            kv_heads=self.cfg.kv_heads, rope=rope, scale=self.cfg.query_pre_attn_scalar ** -0.5,
            softcap=self.cfg.attn_softcap,
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
        norm = lambda: RMSNorm(cfg.hidden, cfg.rms_eps)
        self.self_attn = GemmaAttention(cfg)
        self.encoder_attn = GemmaAttention(cfg, d_kv=cfg.encoder_width)
        self.encoder_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = GeGLU(cfg.hidden, cfg.ffn)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.post_encoder_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, x, layout: Layout, enc_BSd, enc_layout: Layout, rope, cross_kv=None):
        attn = self.self_attn(self.input_layernorm(x), layout, causal=True, window=self.window, rope=rope)
        return self._after_self_attn(x, attn, lambda h: self.encoder_attn(
            h, layout, kv_BSd=enc_BSd, kv_layout=enc_layout, projected_kv=cross_kv))

    def step(self, x_N1d, cache: KVCache, pos, rope, ctx: StepLayer, enc_layout: Layout, beams: int):
        """`forward` for one new token per row with the self-attention cache (generation). Rows are
        batch-major beams (n = b * beams + k); the cross-attention runs the `beams` rows of image b as `beams`
        queries against that image's one cross K/V (never copied per beam). `ctx` (GemmaDecoder.step_layers):
        the fused q|k|v and gate|up weights and the cross K/V in heads layout."""
        c = self.self_attn.cfg
        H, Hk, D = c.heads, c.kv_heads, c.head_dim
        kw = dict(scale=c.query_pre_attn_scalar ** -0.5, softcap=c.attn_softcap)
        n_in, n_attn, n_cross, n_pre, n_ff = ctx.norms or (None,) * 5
        q, k, v = F.linear(_norm(self.input_layernorm, n_in, x_N1d), ctx.w_qkv).split([H * D, Hk * D, Hk * D], -1)
        attn = self.self_attn.o_proj(attend_cached(q, k, v, cache, pos, heads=H, kv_heads=Hk, rope=rope, **kw))
        h, _ = _add_norm(self.post_attention_layernorm, n_attn, x_N1d, attn)
        cross = cross_attend_step(self.encoder_attn.q_proj(h), ctx.cross_k, ctx.cross_v, enc_layout.mask, heads=H,
                                  beams=beams, **kw)
        h, ff_in = _add_norm(self.post_encoder_attention_layernorm, n_cross, h, self.encoder_attn.o_proj(cross),
                             scale=ctx.gate, next_norm=self.pre_feedforward_layernorm, next_w1=n_pre)
        gate, up = F.linear(ff_in, ctx.w_up).chunk(2, dim=-1)
        return _add_norm(self.post_feedforward_layernorm, n_ff, h, self.mlp.down_proj(ops.geglu(gate, up)))[0]

    def _after_self_attn(self, x, attn, cross_attn):
        """The layer after its self-attention output: the residual adds fused with the norms around them
        (norm.add: h = residual + scale * norm(y) [, the next norm of h]); `cross_attn(h)` runs the cross-attention."""
        h, _ = self.post_attention_layernorm.add(x, attn)
        h, ff_in = self.post_encoder_attention_layernorm.add(
            h, cross_attn(h), scale=torch.tanh(self.encoder_attn_gate).to(h.dtype),
            next_norm=self.pre_feedforward_layernorm)
        return self.post_feedforward_layernorm.add(h, self.mlp(ff_in))[0]


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.rms_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        # one GEMM for every layer's cross K/V (modules.project_kv_all_layers); FSDP2 turns it off, since it
        # shards the weights per layer and they are whole only inside that layer's forward
        self.fuse_cross_kv = True

    def cross_kv(self, enc_BSd: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention (k, v), each (B, S, Hk * D), from one GEMM (also the generation cache)."""
        return project_kv_all_layers(enc_BSd, [layer.encoder_attn for layer in self.layers])

    def _embed(self, ids_BL):
        x = self.embed_tokens(ids_BL)
        # sqrt(hidden) rounded to the activation dtype first, as Gemma-2 does (matters in bf16)
        return x * torch.tensor(self.cfg.hidden ** 0.5, dtype=x.dtype)

    def _rope(self, positions_BL, dtype):
        cos, sin = self.rotary.cos_sin(positions_BL, dtype)
        return lambda q, k: Rotary.rotate(q, k, cos, sin)

    def forward(self, ids_BL: torch.Tensor, layout: Layout, enc_BSd: torch.Tensor, enc_layout: Layout):
        """Final hidden states (B, L, d) before the tied lm_head."""
        x = self._embed(ids_BL)
        rope = self._rope(layout.positions(ids_BL.shape[1], ids_BL.device), x.dtype)
        cross = self.cross_kv(enc_BSd) if self.fuse_cross_kv else [None] * len(self.layers)
        for layer, kv in zip(self.layers, cross):
            x = layer(x, layout, enc_BSd, enc_layout, rope, cross_kv=kv)
        return self.norm(x)

    def allocate_cache(self, n: int, max_len: int, dtype, device) -> list[KVCache]:
        """Self-attention caches for `n` rows and up to `max_len` positions; window layers keep only their window."""
        c = self.cfg
        return [KVCache.allocate(n, c.kv_heads, min(layer.window, max_len) if layer.window else max_len, c.head_dim,
                                 dtype, device) for layer in self.layers]

    def step_layers(self, cross) -> list[StepLayer]:
        """The step context of every layer (modules.StepLayer) from its cross (k, v) (B, S, Hk * D) (cross_kv's):
        built once per generation. On the CPU in fp32 / fp64 the norms run without the ops layer (1 + w here)."""
        c = self.cfg
        out = []
        for layer, (k, v) in zip(self.layers, cross):
            a, m = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.post_encoder_attention_layernorm,
                     layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm)
            w = norms[0].weight
            cpu = w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and k.dtype == w.dtype
            out.append(StepLayer(
                cross_k=cross_heads(k, c.kv_heads), cross_v=cross_heads(v, c.kv_heads),
                w_qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                w_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                gate=torch.tanh(layer.encoder_attn_gate).to(k.dtype),
                norms=tuple(1.0 + n.weight for n in norms) if cpu else ()))
        return out

    def step(self, ids_N: torch.Tensor, pos: torch.Tensor, caches: list[KVCache], cross, enc_layout: Layout,
             beams: int) -> torch.Tensor:
        """Final hidden states (N, 1, d) of one new token per row at position `pos` (int64 tensor: 0-dim, shared
        by every row, or (N,), one per row for continuous batching). `cross`: step_layers' context (or the
        cross_kv pairs, turned into it here, once per call)."""
        if enc_layout.packed:
            raise ValueError("the cached decode step takes a padded encoder layout (B, S), not a packed one")
        if cross and not isinstance(cross[0], StepLayer):
            cross = self.step_layers(cross)
        x = self._embed(ids_N[:, None])
        rope = self._rope(pos.view(-1, 1), x.dtype)  # cos / sin (1 or N, 1, 1, D)
        for layer, cache, ctx in zip(self.layers, caches, cross):
            x = layer.step(x, cache, pos, rope, ctx, enc_layout, beams)
        return self.norm(x)
