"""Rotary position embedding (rotate-half convention) applied in place to q and k, in Triton.

    rope_(q, k, cos, sin) -> (q, k)              in place; autograd-aware
    rope_tables(positions, head_dim, theta) -> (cos, sin)
    positions_from_cu_seqlens(cu_seqlens) -> positions

Shape legend: B batch, H query heads, Hk key heads, L length, T packed tokens, D head dim (even), D2 = D / 2.

Layouts
  padded: q (B, H, L, D), k (B, Hk, L, D); cos / sin (Bc, L, D2) with Bc in {1, B} (one table row per token).
  packed: q (T, H, D), k (T, Hk, D); cos / sin (T, D2) or (1, T, D2), built from positions that restart in
          each segment: `rope_tables(positions_from_cu_seqlens(cu_seqlens), D, theta)`.
  Any strides with a contiguous last dim (the (B, L, H, D) -> (B, H, L, D) transposes of a projection output
  are rotated where they live, without a copy).

Semantics (`rope_reference`): with x1 = x[..., :D2], x2 = x[..., D2:], c = cos, s = sin (the first half of
the usual duplicated (.., D) tables):  x1' = x1 c - x2 s,  x2' = x2 c + x1 s, computed in fp32 and rounded once
to x's dtype. Tables: angle = position * theta^(-2j / D) in fp32 (j < D2), as transformers' Gemma-2.
Backward: the inverse rotation (s -> -s) of the incoming gradients, written to new tensors.

Registered as torch.library ops `florenz::rope_` (mutates its input) and `florenz::rope_bwd` (functional);
autograd through a torch.autograd.Function per tensor that marks it dirty (one launch each for q and k). Set
TRITON_INTERPRET=1 before importing on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import positions_from_cu_seqlens, rope_reference

__all__ = ["rope_", "rope_tables", "positions_from_cu_seqlens", "rope_reference", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _rope_kernel(X, Y, COS, SIN, sxb, sxh, sxl, syb, syh, syl, scb, scl, L, H, D2, INVERSE: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
    """One token (b, l): all H heads of x rotated by the table row of that token, written to y (may be x)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // L
    l = pid % L
    offs_j = tl.arange(0, BLOCK_D2)
    offs_h = tl.arange(0, BLOCK_H)
    jm = offs_j < D2
    c = tl.load(COS + b * scb + l * scl + offs_j, mask=jm, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + b * scb + l * scl + offs_j, mask=jm, other=0.0).to(tl.float32)[None, :]
    if INVERSE:
        s = -s
    mask = (offs_h[:, None] < H) & jm[None, :]
    x_ptr = X + b * sxb + l * sxl + offs_h[:, None] * sxh + offs_j[None, :]
    y_ptr = Y + b * syb + l * syl + offs_h[:, None] * syh + offs_j[None, :]
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + D2, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, (x1 * c - x2 * s).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + D2, (x2 * c + x1 * s).to(Y.dtype.element_ty), mask=mask)


def num_warps_for(heads: int, d2: int) -> int:
    return 4 if heads * d2 <= 2048 else 8


def _launch(x, y, cos, sin, inverse):
    """x, y (B, H, L, D) (y may be x: in place); cos / sin (Bc, L, D2)."""
    B, H, L, D = x.shape
    if B * L == 0 or H == 0:
        return
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    bh, bd = triton.next_power_of_2(H), max(2, triton.next_power_of_2(D // 2))
    _rope_kernel[(B * L,)](x, y, cos, sin, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
                           y.stride(2), scb, cos.stride(1), L, H, D // 2, INVERSE=inverse, BLOCK_H=bh,
                           BLOCK_D2=bd, num_warps=num_warps_for(bh, bd))


@torch.library.custom_op("florenz::rope_", mutates_args=("x",))
def rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x (B, H, L, D) in place."""
    _launch(x, x, cos, sin, False)


@rope_inplace.register_fake
def _(x, cos, sin):
    return None


@torch.library.custom_op("florenz::rope_bwd", mutates_args=())
def rope_bwd(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse rotation of dy into a new tensor."""
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty_like(dy)
    _launch(dy, dx, cos, sin, True)
    return dx


@rope_bwd.register_fake
def _(dy, cos, sin):
    return torch.empty_like(dy)


class _Rope(torch.autograd.Function):
    # one tensor per Function: autograd cannot rebase several in-place-modified views returned by one Function
    @staticmethod
    def forward(ctx, x, cos, sin):
        rope_inplace(x, cos, sin)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return x

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_bwd(dy, cos, sin), None, None


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary position embedding (rotate-half) applied to q and k in place.

    With x1 = x[..., :D/2], x2 = x[..., D/2:]: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, in fp32, rounded
    once to x's dtype.

    Args:
      q: fp16 / bf16 / fp32, padded (B, H, L, D) or packed (T, H, D); D even; any strides with a contiguous last
        dim (rotated where it lives, e.g. a transposed projection output).
      k: same layout, dtype, batch / length and head dim as q; its own head count Hk.
      cos, sin: fp32 tables of the first half of the angles (D/2 = D2 columns), one row per token, equal shapes
        and strides with a contiguous last dim: padded (Bc, L, D2) with Bc in {1, B} (or (L, D2)); packed
        (T, D2) or (1, T, D2), built from per-segment positions:
        `rope_tables(positions_from_cu_seqlens(cu_seqlens), D, theta)`.

    Returns:
      (q, k), the same tensors, rotated. Autograd-aware: a tensor that requires grad is rotated through a
      Function marking it dirty; its gradient is the inverse rotation (sin -> -sin). Tables get no gradient.
    """
    packed = q.dim() == 3
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise ValueError(f"rope_: q and k must both be (B, H, L, D) or (T, H, D), got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    q4 = q.transpose(0, 1)[None] if packed else q
    k4 = k.transpose(0, 1)[None] if packed else k
    B, H, L, D = q4.shape
    if k4.shape[0] != B or k4.shape[2] != L or k4.shape[3] != D or D % 2:
        raise ValueError(f"rope_: q {tuple(q.shape)} and k {tuple(k.shape)} need the same batch, length and an "
                         f"even head dim")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"rope_: q and k must share fp16/bf16/fp32, got {q.dtype} and {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_: q and k need a contiguous last dim")
    cos3 = cos[None] if cos.dim() == 2 else cos
    sin3 = sin[None] if sin.dim() == 2 else sin
    want = (L, D // 2)
    if (cos3.dim() != 3 or tuple(cos3.shape[1:]) != want or cos3.shape[0] not in (1, B)
            or cos3.shape != sin3.shape or cos3.stride(-1) != 1 or sin3.stride() != cos3.stride()):
        raise ValueError(f"rope_: cos/sin must be (1 or {B}, {L}, {D // 2}) with a contiguous last dim and the same "
                         f"strides, got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("florenz rope_: CPU tensors need TRITON_INTERPRET=1 set before importing "
                           "florenz_kernels.rope")
    for x in (q4, k4):
        if torch.is_grad_enabled() and x.requires_grad:
            _Rope.apply(x, cos3, sin3)
        else:
            rope_inplace(x, cos3, sin3)
    return q, k


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """RoPE tables for rope_: angle[..., j] = position * theta^(-2j / head_dim), j < head_dim / 2, in fp32
    (as transformers' Gemma-2).

    Args:
      positions: integer tensor of any shape (...), e.g. (L,) / (B, L) padded, or (T,) packed positions that
        restart in each segment (positions_from_cu_seqlens).
      head_dim: D (even).
      theta: the RoPE base.

    Returns:
      (cos, sin), each (..., D/2) fp32 on positions' device.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = positions[..., None].float() * inv_freq
    return angles.cos(), angles.sin()


# ---- static checks (no GPU) ----------------------------------------------------------------------------------


def static_cases(dtype: str) -> list[dict]:
    """Compile jobs for kernels._static.compile_report: Gemma-2 shapes (D = 256: 8 / 16 query heads, 4 / 8 key
    heads) and the `small` preset's (D = 64, 4 heads), forward and inverse."""
    cases = []
    for heads, d2 in ((4, 32), (8, 128), (16, 128)):
        for inverse in (False, True):
            cases.append(dict(fn=_rope_kernel, num_warps=num_warps_for(heads, d2), float_args=set(),
                              ptr_types={"X": dtype, "Y": dtype, "COS": "fp32", "SIN": "fp32"},
                              constexprs=dict(INVERSE=inverse, BLOCK_H=heads, BLOCK_D2=d2)))
    return cases
