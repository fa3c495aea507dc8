"""Fused linear + softcapped cross-entropy for large vocabularies: never materialises the (T, V) logits.

    linear_cross_entropy(hidden, weight, labels, *, softcap=30.0, ignore_index=-100, z_loss=0.0,
                         reduction="mean", chunk_size=None, check_labels=True) -> loss

Shape legend: T tokens, D hidden, V vocabulary, C tokens per chunk.

Semantics (what `linear_cross_entropy_reference` computes, unfused)
  z = hidden @ weight^T (T, V); softcap c > 0: z = c * tanh(z / c) (Gemma-2's final logit cap, c = 30);
  lse_t = log sum_v exp(z_tv) in fp32; loss_t = lse_t - z_t,label_t + z_loss * lse_t^2; loss_t = 0 where
  label_t == ignore_index. reduction "none" -> (T,) fp32; "sum" -> sum; "mean" -> sum / #(label != ignore)
  (NaN when every label is ignored, as torch's cross_entropy); "sum+none" -> (sum, the per-token losses without
  gradient): a training loop that backpropagates a sum and logs per-sample losses keeps the 3-matmul path.
  Label smoothing is not supported (0).
  hidden (..., D) and labels (...) are flattened; weight (V, D) is the (tied) output embedding.

Algorithm (chunk by chunk)
  for each chunk of C tokens: logits = h_C @ W^T (cuBLAS on the GPU, fp32 accumulation, output in the input
  dtype); one Triton program per row does softcap + logsumexp (pass 1) and writes d loss / d logits over the
  logits in place (pass 2); then dh_C = dlogits @ W and dW += dlogits^T @ h_C (fp32 accumulator across
  chunks when there is more than one). Peak extra memory: one C x V chunk, dh (T, D), dW (V, D) — instead of
  several T x V tensors (logits, the softcapped copy, its fp32 upcast, log-softmax, their gradients).
  "sum" / "mean" / "sum+none": the gradient is computed during the forward (3 matmuls per chunk in all) and the
  backward scales the saved dh / dW by the incoming scalar, in place. "none": the forward computes the losses only
  (1 matmul) and the backward recomputes the chunks with the incoming per-token gradient as row weights
  (3 more): exact for any per-token gradient. Neither backward looks at a value, so neither reads anything
  back from the device (DESIGN.md 13; the former shortcut compared the incoming gradient with the saved
  weights, a sync per step); check_labels=False also skips the labels range check (a device->host read) for
  labels already checked on the host (florenz_fast.packing.check_limits).
  On a CPU without TRITON_INTERPRET the same chunked algorithm runs with torch ops for the per-row part (the
  memory win on CPU); with TRITON_INTERPRET=1 the Triton kernel runs in the interpreter (tests).

Registered as torch.library ops `florenz::linear_cross_entropy_fwd` / `florenz::linear_cross_entropy_bwd`
(fake implementations, autograd via register_autograd).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._tl_math import tanh  # FAST_TANH: tanh.approx.f32 for bf16 logits (2^-11 < their 2^-9 rounding)
from .reference import linear_cross_entropy_reference

__all__ = ["linear_cross_entropy", "linear_cross_entropy_reference", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_NO_AUTOTUNE = os.environ.get("FLORENZ_NO_AUTOTUNE", "0") not in ("", "0")


# ---- device functions -----------------------------------------------------------------------------------


@triton.jit
def _ce_rows_kernel(LOGITS, LABELS, LOSS, ROW_SCALE, stride_row, V, ignore_index, cap, inv_cap, z_loss,
                    SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HAS_ZLOSS: tl.constexpr,
                    HAS_ROW_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row of logits: loss (fp32) and, with WRITE_GRAD, d(loss * row_scale)/d(logits) written in place."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int32)
    valid = label != ignore_index
    offs = tl.arange(0, BLOCK_V)
    # pass 1: per-lane online max / sum of exp, combined at the end
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        mask = v0 + offs < V
        z = tl.load(base + v0 + offs, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            z = cap * tanh(z * inv_cap, FAST_TANH)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    s_row = tl.sum(s * tl.exp(m - m_row), 0)
    lse = m_row + tl.log(s_row)
    z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        z_label = cap * tanh(z_label * inv_cap, FAST_TANH)
    loss = lse - z_label
    if HAS_ZLOSS:
        loss += z_loss * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)
        if HAS_ROW_SCALE:
            scale = scale * tl.load(ROW_SCALE + row).to(tl.float32)
        p_scale = scale
        if HAS_ZLOSS:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        # pass 2: dz = (softmax * (1 + 2 z lse) - onehot) * (1 - tanh^2), over the logits in place
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            mask = idx < V
            z = tl.load(base + idx, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = tanh(z * inv_cap, FAST_TANH)
                p = tl.exp(cap * t - lse)
                d = (p * p_scale - tl.where(idx == label, scale, 0.0)) * (1.0 - t * t)
            else:
                p = tl.exp(z - lse)
                d = p * p_scale - tl.where(idx == label, scale, 0.0)
            tl.store(base + idx, d.to(LOGITS.dtype.element_ty), mask=mask)


# (BLOCK_V, num_warps) per dtype width; checked by the static tests (no spills on sm_80 / sm_90)
_GPU_CONFIG = {2: (4096, 16), 4: (2048, 16), 8: (1024, 8)}
_CPU_CONFIG = (64, 4)


def config_for(dtype: torch.dtype) -> tuple[int, int]:
    if INTERPRET:
        return _CPU_CONFIG
    return _GPU_CONFIG[torch.empty((), dtype=dtype).element_size()]


def all_configs() -> list[tuple[int, int]]:
    return sorted(set(_GPU_CONFIG.values()))


# ---- the per-row part: Triton kernel, or torch ops on a CPU without the interpreter ----------------------


def _use_triton(t: torch.Tensor) -> bool:
    return (t.is_cuda or INTERPRET) and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _rows_triton(logits_CV, labels_C, row_scale_C, softcap, ignore_index, z_loss, write_grad):
    C, V = logits_CV.shape
    loss = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    if C == 0:
        return loss
    block_v, warps = config_for(logits_CV.dtype)
    block_v = min(block_v, max(16, triton.next_power_of_2(V)))
    fast = logits_CV.dtype == torch.bfloat16 and not INTERPRET
    _ce_rows_kernel[(C,)](
        logits_CV, labels_C, loss, row_scale_C if row_scale_C is not None else loss, logits_CV.stride(0), V,
        ignore_index, float(softcap or 1.0), 1.0 / float(softcap or 1.0), float(z_loss),
        SOFTCAP=bool(softcap), FAST_TANH=fast, HAS_ZLOSS=bool(z_loss), HAS_ROW_SCALE=row_scale_C is not None,
        WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps)
    return loss


def _rows_torch(logits_CV, labels_C, row_scale_C, softcap, ignore_index, z_loss, write_grad, tanh_=None):
    """The same per-row math with in-place torch ops: two C x V buffers (the logits and one more), one exp pass
    (p = exp(z - rowmax) gives both the logsumexp and the softmax). `tanh_(x, inner)`: tanh(inner * x) in place
    (None: torch's; florenz_fast's dense backend passes a faster sigmoid form)."""
    valid = labels_C != ignore_index
    safe = torch.where(valid, labels_C, 0).long()[:, None]
    work = logits_CV if logits_CV.dtype in (torch.float32, torch.float64) else logits_CV.float()
    t = None
    if softcap:  # t = tanh(z / c), in place
        t = work.div_(softcap).tanh_() if tanh_ is None else tanh_(work, 1.0 / softcap)
        capped = t * softcap
    else:
        capped = work
    m = capped.amax(-1, keepdim=True)
    picked = capped.gather(1, safe)[:, 0]
    p = capped.sub_(m).exp_()
    total = p.sum(-1)
    lse = m[:, 0] + total.log()
    loss = lse - picked
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    if write_grad:
        scale = valid.to(capped.dtype)
        if row_scale_C is not None:
            scale = scale * row_scale_C.to(capped.dtype)
        p_scale = scale * (1.0 + 2.0 * z_loss * lse) if z_loss else scale
        d = p.mul_((p_scale / total)[:, None])                             # softmax * scale (* (1 + 2 z lse))
        d.scatter_add_(1, safe, -scale[:, None])
        if softcap:
            d = t.square_().neg_().add_(1.0).mul_(d)                       # (1 - tanh^2) * d, in t's buffer
        if d is not logits_CV:
            logits_CV.copy_(d)
    return loss


# ---- the chunked driver ------------------------------------------------------------------------------------


def default_chunk_size(T: int, V: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: a logits chunk of about 2 GiB on the GPU (few, large matmuls) and 128 MiB on the CPU,
    split evenly over the tokens."""
    budget = (2 << 30) if device.type == "cuda" else (128 << 20)
    elem = max(torch.empty((), dtype=dtype).element_size(), 4 if device.type != "cuda" else 1)
    per_chunk = max(1, budget // max(1, V * elem))
    n_chunks = max(1, math.ceil(T / per_chunk))
    return max(1, math.ceil(T / n_chunks))


def _chunked(h_TD, w_VD, labels_T, row_scale_T, softcap, ignore_index, z_loss, chunk, need_dh, need_dw,
             rows=None):
    """(loss (T,), dh or None, dw or None); `rows`: the per-row part (default: the Triton kernel where it runs,
    else the torch ops)."""
    T, D = h_TD.shape
    loss = torch.empty(T, dtype=torch.promote_types(h_TD.dtype, torch.float32), device=h_TD.device)
    dh = torch.empty_like(h_TD) if need_dh else None
    n_chunks = math.ceil(T / chunk) if T else 0
    dw = None
    dw_acc = None
    if need_dw:
        if n_chunks <= 1 or w_VD.dtype in (torch.float32, torch.float64):
            dw = torch.zeros_like(w_VD)
        else:  # 16-bit weights: accumulate the chunks in fp32, round once at the end
            dw_acc = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
    rows = rows or (_rows_triton if _use_triton(h_TD) else _rows_torch)
    write_grad = need_dh or need_dw
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        h_C = h_TD[s:e]
        logits = h_C @ w_VD.t()                                   # (C, V), fp32 accumulation in cuBLAS
        loss[s:e] = rows(logits, labels_T[s:e], None if row_scale_T is None else row_scale_T[s:e], softcap,
                         ignore_index, z_loss, write_grad)
        if need_dh:
            torch.mm(logits, w_VD, out=dh[s:e])
        if dw is not None:
            if n_chunks == 1:
                torch.mm(logits.t(), h_C, out=dw)
            else:
                dw.addmm_(logits.t(), h_C)
        elif dw_acc is not None:
            if dw_acc.is_cuda:
                torch.addmm(dw_acc, logits.t(), h_C, out_dtype=torch.float32, out=dw_acc)
            else:
                dw_acc.add_(logits.t() @ h_C)
        del logits
    if dw_acc is not None:
        dw = dw_acc.to(w_VD.dtype)
    return loss, dh, dw


# ---- torch.library ops -------------------------------------------------------------------------------------

_EMPTY = (0,)


@torch.library.custom_op("florenz::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             token_weight: Optional[torch.Tensor], softcap: float, ignore_index: int, z_loss: float,
                             chunk_size: int, need_dh: bool, need_dw: bool, grad_in_forward: bool,
                             check_labels: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (per-token losses (T,) fp32 (fp64 for fp64 input), S = sum_t token_weight_t * loss_t (0-dim; token_weight
    None: all 1), d S / d hidden (T, D) or empty, d S / d weight (V, D) or empty). need_dh / need_dw: which inputs
    get gradients; the gradients of S are computed here only with grad_in_forward (else the backward recomputes)."""
    T = hidden.shape[0]
    V = weight.shape[0]
    if T and check_labels:
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: labels outside [0, {V}) that are not ignore_index "
                             f"({ignore_index}): {labels[bad][:8].tolist()}")
    need_dh, need_dw = need_dh and grad_in_forward, need_dw and grad_in_forward
    loss, dh, dw = _chunked(hidden, weight, labels, token_weight, softcap, ignore_index, z_loss, chunk_size, need_dh,
                            need_dw)
    total = (loss * token_weight).sum() if token_weight is not None else loss.sum()
    return (loss, total, dh if dh is not None else hidden.new_empty(_EMPTY),
            dw if dw is not None else weight.new_empty(_EMPTY))


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, token_weight, softcap, ignore_index, z_loss, chunk_size, need_dh, need_dw,
      grad_in_forward, check_labels):
    T = hidden.shape[0]
    dt = torch.promote_types(hidden.dtype, torch.float32)
    return (hidden.new_empty((T,), dtype=dt), hidden.new_empty((), dtype=dt),
            hidden.new_empty(hidden.shape if need_dh and grad_in_forward else _EMPTY),
            weight.new_empty(weight.shape if need_dw and grad_in_forward else _EMPTY))


@torch.library.custom_op("florenz::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(grad_T: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             softcap: float, ignore_index: int, z_loss: float, chunk_size: int, need_dh: bool,
                             need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_t grad_t * loss_t: the chunks recomputed with grad_T as per-row weights."""
    # contiguous: the gradient of a sum or mean arrives expanded (stride 0), and the row kernel indexes it densely
    _, out_dh, out_dw = _chunked(hidden, weight, labels, grad_T.contiguous(), softcap, ignore_index, z_loss,
                                 chunk_size, need_dh, need_dw)
    return (out_dh if out_dh is not None else hidden.new_empty(_EMPTY),
            out_dw if out_dw is not None else weight.new_empty(_EMPTY))


@linear_cross_entropy_bwd.register_fake
def _(grad_T, hidden, weight, labels, softcap, ignore_index, z_loss, chunk_size, need_dh, need_dw):
    return (hidden.new_empty(hidden.shape if need_dh else _EMPTY),
            weight.new_empty(weight.shape if need_dw else _EMPTY))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, token_weight, softcap, ignore_index, z_loss, chunk, need_dh, need_dw, in_fwd, _ = inputs
    _, _, dh, dw = output
    # dh / dw are outputs only to be saved: never materialise zero gradients for them (a V x D zeros tensor)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, labels, dh, dw)
    ctx.args = (softcap, ignore_index, z_loss, chunk, need_dh, need_dw)
    ctx.grad_in_forward = in_fwd


def _scaled(saved: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # in place in eager mode: a V x D dW copy doubled the loss's memory (the saved tensor is not used again; a
    # second backward through the same graph fails autograd's version check instead of reading a scaled dW)
    if torch.compiler.is_compiling():
        return saved * g.to(saved.dtype)
    return saved.mul_(g.to(saved.dtype))


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _backward_formula(ctx, g_loss, g_total, _g_dh, _g_dw):
    hidden, weight, labels, dh, dw = ctx.saved_tensors
    need_dh, need_dw = ctx.args[4], ctx.args[5]
    out_dh = out_dw = None
    if g_total is not None:  # "sum" / "mean": the saved gradients of S, times the incoming scalar
        if not ctx.grad_in_forward:
            raise RuntimeError("linear_cross_entropy: the total of a reduction='none' call has no saved gradients")
        out_dh = _scaled(dh, g_total) if need_dh else None
        out_dw = _scaled(dw, g_total) if need_dw else None
    if g_loss is not None:  # per-token gradient ("none"): recompute with it as row weights
        r_dh, r_dw = linear_cross_entropy_bwd(g_loss, hidden, weight, labels, *ctx.args)
        out_dh, out_dw = _add(out_dh, r_dh if need_dh else None), _add(out_dw, r_dw if need_dw else None)
    return (out_dh, out_dw) + (None,) * 10


linear_cross_entropy_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


# ---- public API ----------------------------------------------------------------------------------------------


REDUCTIONS = ("mean", "sum", "none", "sum+none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float = 30.0,
                         ignore_index: int = -100, z_loss: float = 0.0, reduction: str = "mean",
                         chunk_size: int | None = None, check_labels: bool = True) -> torch.Tensor:
    """Fused lm_head + final logit softcap + cross-entropy, chunked over tokens: never the (T, V) logits.

    z = hidden @ weight^T; softcap c > 0: z = c * tanh(z / c); loss_t = lse_t - z_t,label_t + z_loss * lse_t^2
    with lse_t = log sum_v exp(z_tv) in fp32; loss_t = 0 where label_t == ignore_index.

    Args:
      hidden: (..., D) fp16 / bf16 / fp32 (fp64 too, on the torch path), any leading shape (flattened to T
        tokens). Under autocast hidden and weight are cast to the autocast dtype, as F.linear would; otherwise
        they must share a dtype.
      weight: (V, D), the (tied) output embedding, same device.
      labels: hidden's leading shape, int32 / int64 token ids in [0, V) or ignore_index.
      softcap: final logit softcap c (Gemma-2: 30); 0 = none.
      ignore_index: label value that contributes no loss and no gradient.
      z_loss: weight of the lse^2 auxiliary term (>= 0; 0 = off).
      reduction: "mean" (sum / number of non-ignored labels; NaN when every label is ignored, as
        torch's cross_entropy), "sum", "none", or "sum+none" (the sum and the per-token losses).
      chunk_size: tokens per logits chunk; None = about 2 GiB of logits per chunk on the GPU, 128 MiB on the
        CPU (default_chunk_size).
      check_labels: raise a ValueError for labels outside [0, V) that are not ignore_index. It reads a value
        back from the device: pass False for labels checked on the host (the training loop does).

    Returns:
      "mean" / "sum": a 0-dim fp32 tensor (fp64 for fp64 input); "none": labels' shape, the per-token losses;
      "sum+none": (the sum, differentiable; the per-token losses, labels' shape, without gradient).
      Differentiable in hidden and weight. "mean" / "sum": the gradients are computed during the forward (only dh
      and dW are kept) and scaled by the incoming gradient in the backward. "none": the backward recomputes the
      chunks with the incoming per-token gradient (one more logits matmul than "sum", in exchange for no saved
      V x D dW and an exact result for any per-token weighting).
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (..., D) and weight (V, D) must share D, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must match hidden's leading dims "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int32/int64, got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if softcap < 0 or z_loss < 0:
        raise ValueError(f"linear_cross_entropy: softcap ({softcap}) and z_loss ({z_loss}) must be >= 0")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):  # the matmuls run at the autocast dtype, as F.linear would
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
    elif hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden {hidden.dtype} and weight {weight.dtype} differ")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: tensors on different devices: hidden {hidden.device}, weight "
                         f"{weight.device}, labels {labels.device}")
    lead = labels.shape
    h_TD = hidden.reshape(-1, hidden.shape[-1])
    if not h_TD.is_contiguous():
        h_TD = h_TD.contiguous()
    labels_T = labels.reshape(-1).contiguous()
    T, V = h_TD.shape[0], weight.shape[0]
    chunk = int(chunk_size or default_chunk_size(T, V, h_TD.dtype, h_TD.device))
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk}")
    grad = torch.is_grad_enabled()
    valid = labels_T != ignore_index
    # "mean": the saved gradients are those of the mean already (weights 1/n), so backward hands them over as is
    token_weight = (valid / valid.sum().clamp_min(1)).to(torch.promote_types(h_TD.dtype, torch.float32)) \
        if reduction == "mean" else None
    losses, total, _, _ = linear_cross_entropy_fwd(h_TD, weight, labels_T, token_weight, float(softcap),
                                                   int(ignore_index), float(z_loss), chunk,
                                                   grad and h_TD.requires_grad, grad and weight.requires_grad,
                                                   reduction != "none", bool(check_labels))
    if reduction == "none":
        return losses.view(lead)
    if reduction == "sum":
        return total
    if reduction == "sum+none":
        return total, losses.detach().view(lead)
    # NaN when every label is ignored, as torch's cross_entropy (without a host sync)
    return torch.where(valid.any(), total, torch.nan)


# ---- static checks (no GPU): every config compiles for sm_80 / sm_90 without spills ---------------------------


def static_cases(dtype: str) -> list[dict]:
    """Compile jobs for kernels._static.compile_report: the row kernel in every flag combination the launcher
    uses, at the config of `dtype` ("bf16" / "fp16" / "fp32")."""
    block_v, warps = _GPU_CONFIG[4 if dtype == "fp32" else 2]
    cases = []
    for softcap in (True, False):
        for zl in (False, True):
            for row_scale in (False, True):
                cases.append(dict(fn=_ce_rows_kernel, num_warps=warps, float_args={"cap", "inv_cap", "z_loss"},
                                  ptr_types={"LOGITS": dtype, "LABELS": "i64", "LOSS": "fp32", "ROW_SCALE": "fp32"},
                                  constexprs=dict(SOFTCAP=softcap, FAST_TANH=dtype == "bf16", HAS_ZLOSS=zl,
                                                  HAS_ROW_SCALE=row_scale, WRITE_GRAD=True, BLOCK_V=block_v)))
    return cases
