"""Gemma RMSNorm in Triton, alone or fused with the residual add around it (forward + backward).

    rms_norm(x, weight, eps) -> out
    add_rms_norm(residual, y, weight, eps, *, scale=None, next_weight=None, next_eps=None) -> (h, next_out)

Shape legend: R rows (all leading dims flattened), D normalised dim.

Semantics (`rms_norm_reference` / `add_rms_norm_reference`, and SPEC §4)
  norm_w(y) = (y32 * rsqrt(mean(y32^2) + eps) * (1 + w32)).to(y.dtype)    fp32 math, weight applied *before*
                                                                          the cast back (Gemma, not Llama)
  add_rms_norm: h = residual + scale * norm_w(y)   (each step rounded as the eager model rounds it: the norm
                to y's dtype, the product with `scale` (a 1-element tensor, e.g. tanh(gate), taken in h's dtype)
                and the sum to h's dtype = promote(residual, y): under autocast an fp32 residual stream plus a
                bf16 projection output gives fp32 h, as in the eager layer);
                next_out = norm_{next_weight}(h) when next_weight is given (the following pre-norm), else None.
  In a Gemma-2 layer: h = x + post_attention_layernorm(attn)  and
  h = h + tanh(gate) * post_encoder_attention_layernorm(cross) -> pre_feedforward_layernorm(h), one kernel each.

Kernels: one program per row (BLOCK_D = next power of two >= D) in the forward; the backward runs a fixed
number of programs over strided rows, each accumulating its dW / dscale partials in fp32 registers (summed by
torch afterwards: deterministic, no atomics). Saved for the backward: y, the per-row rstd (fp32), and h when
the next norm is fused; never the normalised values.

Registered as torch.library ops `florenz::rms_norm_fwd` / `florenz::rms_norm_bwd` (fake implementations,
autograd via register_autograd). fp16 / bf16 / fp32; set TRITON_INTERPRET=1 before importing on a CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import add_rms_norm_reference, rms_norm_reference

__all__ = ["rms_norm", "add_rms_norm", "rms_norm_reference", "add_rms_norm_reference", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_D = 4096  # Gemma-2 2B / 9B widths (2304 / 3584); the 8192 backward spilled 184+ B at 8 and 16 warps


@triton.jit
def _rd(x, DT: tl.constexpr):
    """Round an fp32 value to the activation dtype and back (what the eager model's casts do)."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _fwd_kernel(X, Y, W, S, W2, H, O2, R1, R2, stride_x, stride_y, stride_h, stride_o, D, eps, eps2,
                HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    DT: tl.constexpr = H.dtype.element_ty    # h = promote(residual, y): the residual stream's dtype
    DTY: tl.constexpr = Y.dtype.element_ty   # the norm's output dtype
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    y = tl.load(Y + row * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    r1 = 1.0 / tl.sqrt(tl.sum(y * y, 0) / D + eps)
    n = _rd(y * r1 * (1.0 + w), DTY)
    if HAS_RES:
        if HAS_SCALE:
            n = _rd(n * tl.load(S).to(tl.float32), DT)
        h = _rd(tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32) + n, DT)
    else:
        h = n
    tl.store(H + row * stride_h + offs, h.to(DT), mask=mask)
    tl.store(R1 + row, r1)
    if HAS_NEXT:
        w2 = tl.load(W2 + offs, mask=mask, other=0.0).to(tl.float32)
        r2 = 1.0 / tl.sqrt(tl.sum(h * h, 0) / D + eps2)
        tl.store(O2 + row * stride_o + offs, (h * r2 * (1.0 + w2)).to(DT), mask=mask)
        tl.store(R2 + row, r2)


@triton.jit
def _bwd_kernel(DH, DO2, Y, H, W, S, W2, R1, R2, DX, DY, DW_PART, DW2_PART, DS_PART,
                stride_dh, stride_do, stride_y, stride_h, stride_dx, stride_dy, R, D, rows_per_prog,
                HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_NEXT: tl.constexpr, NEED_DX: tl.constexpr,
                BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    DT: tl.constexpr = H.dtype.element_ty
    DTY: tl.constexpr = DY.dtype.element_ty
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    # w / w2 are re-read per row (L1/L2 hits) and d scale is a scalar: holding them across the loop spilled on
    # sm_80 at BLOCK_D 4096 with every flag on (static checks)
    dw = tl.zeros([BLOCK_D], tl.float32)
    dw2 = tl.zeros([BLOCK_D], tl.float32)
    ds = 0.0
    if HAS_SCALE:
        s = tl.load(S).to(tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = start + i
        if row < R:
            row64 = row.to(tl.int64)
            dh = tl.load(DH + row64 * stride_dh + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_NEXT:  # d next_out -> d h, added to the incoming d h in the activation dtype
                h = tl.load(H + row64 * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
                do2 = tl.load(DO2 + row64 * stride_do + offs, mask=mask, other=0.0).to(tl.float32)
                w2 = tl.load(W2 + offs, mask=mask, other=0.0).to(tl.float32)
                r2 = tl.load(R2 + row64)
                hhat = h * r2
                u2 = do2 * (1.0 + w2)
                dh = _rd(dh + _rd(r2 * (u2 - hhat * (tl.sum(u2 * hhat, 0) / D)), DT), DT)
                dw2 += do2 * hhat
            y = tl.load(Y + row64 * stride_y + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            r1 = tl.load(R1 + row64)
            yhat = y * r1
            if HAS_RES:
                if NEED_DX:
                    tl.store(DX + row64 * stride_dx + offs, dh.to(DX.dtype.element_ty), mask=mask)
                if HAS_SCALE:
                    ds += tl.sum(dh * _rd(yhat * (1.0 + w), DTY), 0)
                    dn = _rd(dh * s, DTY)
                else:
                    dn = _rd(dh, DTY)
            else:
                dn = dh
            u = dn * (1.0 + w)
            dy = r1 * (u - yhat * (tl.sum(u * yhat, 0) / D))
            tl.store(DY + row64 * stride_dy + offs, dy.to(DTY), mask=mask)
            dw += dn * yhat
    tl.store(DW_PART + pid * D + offs, dw, mask=mask)
    if HAS_NEXT:
        tl.store(DW2_PART + pid * D + offs, dw2, mask=mask)
    if HAS_SCALE:
        tl.store(DS_PART + pid, ds)


# ---- configs -------------------------------------------------------------------------------------------


def num_warps_for(block_d: int, backward: bool = False) -> int:
    # backward: 4 warps spilled at BLOCK_D 2048 and 16 warps (128 registers a thread) at 4096 (static checks)
    if backward:
        return 8
    return 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _bwd_programs(R: int, device: torch.device) -> int:
    if device.type == "cuda" and not INTERPRET:
        return max(1, min(R, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(R, 4))


# ---- torch.library ops -------------------------------------------------------------------------------------

_EMPTY = (0,)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    t2 = t.reshape(-1, D)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@torch.library.custom_op("florenz::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(residual: Optional[torch.Tensor], y: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                 next_weight: Optional[torch.Tensor], eps: float, next_eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (h, next_out or empty, rstd1 (R,) fp32, rstd2 (R,) fp32 or empty)."""
    D = y.shape[-1]
    y2 = _rows(y, D)
    R = y2.shape[0]
    x2 = _rows(residual, D) if residual is not None else y2
    h_dtype = y.dtype if residual is None else torch.promote_types(residual.dtype, y.dtype)
    h = torch.empty(y.shape, dtype=h_dtype, device=y.device)
    h2 = h.view(-1, D)
    has_next = next_weight is not None
    o2 = torch.empty(y.shape, dtype=h_dtype, device=y.device) if has_next else y.new_empty(_EMPTY)
    o22 = o2.view(-1, D) if has_next else h2
    r1 = torch.empty(R, dtype=torch.float32, device=y.device)
    r2 = torch.empty(R, dtype=torch.float32, device=y.device) if has_next else r1.new_empty(_EMPTY)
    if R:
        bd = _block_d(D)
        _fwd_kernel[(R,)](x2, y2, weight, scale if scale is not None else weight,
                          next_weight if has_next else weight, h2, o22, r1, r2 if has_next else r1,
                          x2.stride(0), y2.stride(0), h2.stride(0), o22.stride(0), D, float(eps), float(next_eps),
                          HAS_RES=residual is not None, HAS_SCALE=scale is not None, HAS_NEXT=has_next,
                          BLOCK_D=bd, num_warps=num_warps_for(bd))
    return h, o2, r1, r2


@rms_norm_fwd.register_fake
def _(residual, y, weight, scale, next_weight, eps, next_eps):
    R = y.numel() // y.shape[-1] if y.shape[-1] else 0
    has_next = next_weight is not None
    h_dtype = y.dtype if residual is None else torch.promote_types(residual.dtype, y.dtype)
    return (torch.empty_like(y, dtype=h_dtype), torch.empty_like(y, dtype=h_dtype) if has_next else y.new_empty(_EMPTY),
            y.new_empty((R,), dtype=torch.float32), y.new_empty((R,) if has_next else _EMPTY, dtype=torch.float32))


@torch.library.custom_op("florenz::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dh: torch.Tensor, dnext: Optional[torch.Tensor], y: torch.Tensor, h: Optional[torch.Tensor],
                 weight: torch.Tensor, scale: Optional[torch.Tensor], next_weight: Optional[torch.Tensor],
                 rstd1: torch.Tensor, rstd2: Optional[torch.Tensor], residual_dtype: Optional[torch.dtype]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (d residual or empty, d y, d weight, d scale or empty, d next_weight or empty)."""
    D = y.shape[-1]
    y2 = _rows(y, D)
    R = y2.shape[0]
    dh2 = _rows(dh, D)
    has_next = next_weight is not None
    has_residual = residual_dtype is not None
    dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    dx = torch.empty(y.shape, dtype=residual_dtype, device=y.device) if has_residual else y.new_empty(_EMPTY)
    P = _bwd_programs(R, y.device)
    dw_part = torch.zeros(P, D, dtype=torch.float32, device=y.device)
    dw2_part = torch.zeros(P, D, dtype=torch.float32, device=y.device) if has_next else dw_part
    ds_part = torch.zeros(P, dtype=torch.float32, device=y.device)
    if R:
        do2 = _rows(dnext, D) if has_next else dh2
        h2 = _rows(h, D) if has_next else dh2  # (only its dtype is read without the next norm)
        dx2 = dx.view(-1, D) if has_residual else dy.view(-1, D)
        bd = _block_d(D)
        _bwd_kernel[(P,)](dh2, do2, y2, h2, weight, scale if scale is not None else weight,
                          next_weight if has_next else weight, rstd1, rstd2 if has_next else rstd1, dx2,
                          dy.view(-1, D), dw_part, dw2_part, ds_part, dh2.stride(0), do2.stride(0), y2.stride(0),
                          h2.stride(0), dx2.stride(0), D, R, D, triton.cdiv(R, P), HAS_RES=has_residual,
                          HAS_SCALE=scale is not None, HAS_NEXT=has_next, NEED_DX=has_residual, BLOCK_D=bd,
                          num_warps=num_warps_for(bd, backward=True))
    dw = dw_part.sum(0).to(weight.dtype)
    ds = ds_part.sum().reshape(scale.shape).to(scale.dtype) if scale is not None else y.new_empty(_EMPTY)
    dw2 = dw2_part.sum(0).to(next_weight.dtype) if has_next else y.new_empty(_EMPTY)
    return dx, dy, dw, ds, dw2


@rms_norm_bwd.register_fake
def _(dh, dnext, y, h, weight, scale, next_weight, rstd1, rstd2, residual_dtype):
    return (torch.empty_like(y, dtype=residual_dtype) if residual_dtype is not None else y.new_empty(_EMPTY),
            torch.empty_like(y),
            torch.empty_like(weight), torch.empty_like(scale) if scale is not None else y.new_empty(_EMPTY),
            torch.empty_like(next_weight) if next_weight is not None else y.new_empty(_EMPTY))


def _setup_context(ctx, inputs, output):
    residual, y, weight, scale, next_weight, eps, next_eps = inputs
    h, o2, r1, r2 = output
    has_next = next_weight is not None
    ctx.save_for_backward(y, h if has_next else None, weight, scale, next_weight, r1, r2 if has_next else None)
    ctx.residual_dtype = residual.dtype if residual is not None else None


def _backward_formula(ctx, dh, dnext, _dr1, _dr2):
    y, h, weight, scale, next_weight, r1, r2 = ctx.saved_tensors
    if dh is None:
        dh = torch.zeros_like(y)
    if next_weight is not None and dnext is None:
        dnext = torch.zeros_like(y)
    dx, dy, dw, ds, dw2 = rms_norm_bwd(dh, dnext if next_weight is not None else None, y, h, weight, scale,
                                       next_weight, r1, r2, ctx.residual_dtype)
    return (dx if ctx.residual_dtype is not None else None, dy, dw, ds if scale is not None else None,
            dw2 if next_weight is not None else None, None, None)


rms_norm_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


# ---- public API --------------------------------------------------------------------------------------------


def _check(name, t, like):
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: fp16/bf16/fp32 only, got {t.dtype}")
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"{name}: shape/dtype/device {tuple(t.shape)} {t.dtype} {t.device} differ from "
                         f"{tuple(like.shape)} {like.dtype} {like.device}")


def _check_weight(name, w, D, device):
    if w.dim() != 1 or w.shape[0] != D or w.device != device:
        raise ValueError(f"{name}: weight must be ({D},) on {device}, got {tuple(w.shape)} on {w.device}")


def _check_runnable(t):
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("florenz rms_norm: CPU tensors need TRITON_INTERPRET=1 set before importing "
                           "florenz_kernels.rms_norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm over the last dim: (x32 * rsqrt(mean(x32^2) + eps) * (1 + w32)).to(x.dtype), fp32 math,
    the weight applied before the cast back (Gemma, not Llama).

    Args:
      x: (..., D) fp16 / bf16 / fp32, any leading shape (flattened to R rows), D <= MAX_D (4096).
      weight: (D,) on x's device, any float dtype (read in fp32); the stored Gemma weight w (the scale is 1 + w).
      eps: added to the mean square.

    Returns:
      (..., D) in x's dtype, differentiable in x and weight (Triton backward: deterministic, no atomics).
    """
    _check("rms_norm x", x, None)
    _check_weight("rms_norm", weight, x.shape[-1], x.device)
    if x.shape[-1] > MAX_D:
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} > {MAX_D}")
    _check_runnable(x)
    return rms_norm_fwd(None, x, weight, None, None, float(eps), 0.0)[0]


def add_rms_norm(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 scale: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                 next_eps: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual add around a Gemma RMSNorm, optionally fused with the next pre-norm, in one kernel:
    h = residual + scale * norm_weight(y);  next_out = norm_next_weight(h) when next_weight is given.

    Args:
      residual: (..., D) fp16 / bf16 / fp32, the residual stream; same shape and device as y (dtypes may differ:
        under autocast an fp32 residual plus a bf16 projection output).
      y: (..., D) fp16 / bf16 / fp32, the sublayer output to normalise; D <= MAX_D (4096).
      weight: (D,) Gemma weight of y's norm (scale 1 + w, read in fp32).
      eps: that norm's epsilon.
      scale: optional 1-element tensor on y's device multiplying the normalised y (e.g. tanh(gate) of a gated
        cross-attention), taken in h's dtype; None = 1.
      next_weight: optional (D,) weight of the following norm, applied to h (the next pre-norm).
      next_eps: its epsilon; None = eps.

    Each step is rounded as the eager layer rounds it: the norm to y's dtype, the product with scale and the sum
    to h's dtype = promote(residual.dtype, y.dtype).

    Returns:
      (h, next_out): h (..., D) in promote(residual, y) dtype; next_out the same shape and dtype, or None
      without next_weight. Differentiable in residual, y, weight, scale and next_weight (saved: y, h when the
      next norm is fused, fp32 per-row rstd).
    """
    _check("add_rms_norm y", y, None)
    _check("add_rms_norm residual", residual, None)
    if residual.shape != y.shape or residual.device != y.device:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} on {residual.device} and y "
                         f"{tuple(y.shape)} on {y.device} must match")
    D = y.shape[-1]
    if D > MAX_D:
        raise ValueError(f"add_rms_norm: last dim {D} > {MAX_D}")
    _check_weight("add_rms_norm", weight, D, y.device)
    if next_weight is not None:
        _check_weight("add_rms_norm next", next_weight, D, y.device)
    if scale is not None:
        if scale.numel() != 1 or scale.device != y.device:
            raise ValueError(f"add_rms_norm: scale must be one element on {y.device}, got {tuple(scale.shape)} "
                             f"on {scale.device}")
        scale = scale.to(torch.promote_types(residual.dtype, y.dtype))
    _check_runnable(y)
    h, o2, _, _ = rms_norm_fwd(residual, y, weight, scale, next_weight, float(eps),
                               float(eps if next_eps is None else next_eps))
    return h, (o2 if next_weight is not None else None)


# ---- static checks (no GPU) ----------------------------------------------------------------------------------

STATIC_BLOCK_D = (256, 1024, MAX_D)  # `small`-preset width, Gemma-2-2B / 9B (2304 / 3584), the largest allowed


def static_cases(dtype: str) -> list[dict]:
    """Compile jobs for kernels._static.compile_report: forward and backward for plain / residual / residual +
    scale + next norm, at each BLOCK_D class with the launcher's num_warps."""
    cases = []
    for bd in STATIC_BLOCK_D:
        for res, sc, nxt in ((False, False, False), (True, False, False), (True, True, True)):
            flags = dict(HAS_RES=res, HAS_SCALE=sc, HAS_NEXT=nxt, BLOCK_D=bd)
            cases.append(dict(fn=_fwd_kernel, num_warps=num_warps_for(bd), float_args={"eps", "eps2"},
                              ptr_types={**{n: dtype for n in ("X", "Y", "S", "H", "O2")}, "W": "fp32", "W2": "fp32",
                                         "R1": "fp32", "R2": "fp32"}, constexprs=flags))
            cases.append(dict(fn=_bwd_kernel, num_warps=num_warps_for(bd, backward=True), float_args=set(),
                              ptr_types={**{n: dtype for n in ("DH", "DO2", "Y", "H", "S", "DX", "DY")},
                                         **{n: "fp32" for n in ("W", "W2", "R1", "R2", "DW_PART", "DW2_PART",
                                                                "DS_PART")}},
                              constexprs={**flags, "NEED_DX": res}))
    return cases
