"""Small building blocks shared by the model parts: the batch layout, the head-splitting attention call, and the
all-layer cross-attention K/V projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


@dataclass
class Layout:
    """How a batch of token sequences is laid out.

    padded: x is (B, L, ...); `mask` (B, L) bool marks real tokens (None: all real).
    packed: x is (1, T, ...) holding N sequences back to back; `cu_seqlens` (N+1,) int32 gives their bounds.
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @staticmethod
    def from_lengths(lengths: list[int], device=None) -> "Layout":
        return Layout(cu_seqlens=ops.cu_seqlens_from_lengths(lengths, device), max_seqlen=max(lengths))

    def positions(self, length: int, device=None) -> torch.Tensor:
        """Token positions: (1, T) restarting per packed segment, or (1, L) = 0..L-1 for right-padded input."""
        if self.packed:
            return ops.positions_from_cu_seqlens(self.cu_seqlens)[None]
        return torch.arange(length, device=device)[None]


def attend(q_BLX, k_BSX, v_BSX, *, heads: int, kv_heads: int, q_layout: Layout, k_layout: Layout,
           rope=None, **kw) -> torch.Tensor:
    """Split heads, apply `rope(q, k)` if given (on (B, H, L, D) tensors), call ops.attention, merge heads."""
    B, L, _ = q_BLX.shape
    S = k_BSX.shape[1]
    q = q_BLX.view(B, L, heads, -1).transpose(1, 2)
    k = k_BSX.view(B, S, kv_heads, -1).transpose(1, 2)
    v = v_BSX.view(B, S, kv_heads, -1).transpose(1, 2)
    if rope is not None:
        q, k = rope(q, k)
    if k_layout.packed:
        if B != 1:
            raise ValueError(f"packed input must have batch dimension 1, got {B}")
        out = ops.attention(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            cu_seqlens_q=q_layout.cu_seqlens, cu_seqlens_k=k_layout.cu_seqlens,
            max_seqlen_q=q_layout.max_seqlen, max_seqlen_k=k_layout.max_seqlen, **kw,
        )
        return out.reshape(1, L, -1)
    out = ops.attention(q, k, v, key_padding_mask=k_layout.mask, **kw)
    return out.transpose(1, 2).reshape(B, L, -1)


def project_kv_all_layers(x_BSd: torch.Tensor, attns: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K and V projections of every attention module in `attns` (each with nn.Linear `k_proj` / `v_proj`,
    biases optional) from one GEMM over their concatenated weights, instead of 2 x len(attns) small ones.

    Returns one (k, v) pair per module, each (B, S, out) and equal to (attn.k_proj(x), attn.v_proj(x)). They
    are column slices of one (B, S, n_layers * 2 * out) result, so every token's K and V for all layers sit
    in one contiguous row; ops.attention's backends take such strided views as they are (last dim
    contiguous), and generation keeps the whole tensor as the cross-attention cache. Autograd splits the
    weight gradient back into the per-layer parameters (one GEMM for all of them as well).
    """
    weights = [w for a in attns for w in (a.k_proj.weight, a.v_proj.weight)]
    biases = [b for a in attns for b in (a.k_proj.bias, a.v_proj.bias)]
    bias = None if biases[0] is None else torch.cat(biases)
    kv = F.linear(x_BSd, torch.cat(weights), bias)
    pieces = kv.split([w.shape[0] for w in weights], dim=-1)
    return [(pieces[2 * i], pieces[2 * i + 1]) for i in range(len(attns))]
