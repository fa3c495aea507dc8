"""`triton`: florenz_kernels' Triton kernels (imported on first use) as the backend of attention and the fused ops.

Calls a kernel does not cover run on the `torch` reference instead (florenz_kernels.reference), so the backend can
be switched on for a whole model: CPU tensors unless TRITON_INTERPRET=1, float64, dtypes or shapes a kernel does
not take (per op below) — except the fused loss, whose chunked algorithm runs on a plain CPU with torch ops for the
per-row part (it never materialises the (T, V) logits).
"""

from __future__ import annotations

import os

import torch

from florenz_kernels import reference as ref

from . import registry
from .registry import register_backend

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_RMS_NORM_MAX_D = 4096  # florenz_kernels.rms_norm.MAX_D (not imported here: that would import triton)


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on t: a CUDA tensor, or a CPU one under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_fused_kernels(t: torch.Tensor) -> bool:
    """True where the `triton` backend is selected and its kernels can run on t (one switch for the engine)."""
    return "triton" in registry.get_backend().split("+") and triton_runs_on(t)


def _triton_importable() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None for name in ("triton", "florenz_kernels"))
    except (ImportError, ValueError):
        return False


def _kernels_run_on(*ts) -> bool:
    """True where the Triton kernels can run these tensors: CUDA, or the interpreter; fp16/bf16/fp32."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return all((t.is_cuda or interp) and t.dtype in _KERNEL_DTYPES for t in ts if t is not None)


# ---- attention: florenz_kernels.softcap_attention ------------------------------------------------------------


def _attention_triton(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, dropout_p):
    """The fused Triton kernel (forward + backward, torch.library op `florenz::softcap_attention_fwd`); same
    conventions as the `torch` backend.

    Calls outside what the kernel covers run on the `torch` reference instead, so that the backend can be
    switched on for a whole model: attention dropout (the BART encoder in training), float64, head dims above
    256 (DaViT's channel attention, whose "head dim" is the number of image patches), and CPU tensors unless
    TRITON_INTERPRET=1.
    """
    if dropout_p or q.dtype == torch.float64 or q.shape[-1] > 256 or not triton_runs_on(q):
        return ref.attention_reference(q, k, v, scale=scale, softcap=softcap, causal=causal, window=window,
                                       key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                       cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p)
    from florenz_kernels.softcap_attention import softcap_attention

    # The kernel takes one dtype. Under autocast, RoPE's fp32 cos/sin promote q and k to fp32 while v comes
    # out of its projection in bf16; run at the autocast dtype, as the matmuls of the reference would.
    dev = q.device.type
    dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
          else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    q, k, v = q.to(dt), k.to(dt), v.to(dt)

    out, _ = softcap_attention(q, k, v, softcap=softcap, scale=scale, causal=causal, window=window,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, key_padding_mask=key_padding_mask)
    return out


# ---- the fused ops ---------------------------------------------------------------------------------------------


def _rms_norm_triton(x, weight, eps):
    if not _kernels_run_on(x, weight) or x.shape[-1] > _RMS_NORM_MAX_D:
        return ref.rms_norm_reference(x, weight, eps)
    from florenz_kernels.rms_norm import rms_norm as kernel

    return kernel(x, weight, eps)


def _add_rms_norm_triton(residual, y, weight, eps, *, scale, next_weight, next_eps):
    if not _kernels_run_on(residual, y, weight, scale, next_weight) or y.shape[-1] > _RMS_NORM_MAX_D:
        return ref.add_rms_norm_reference(residual, y, weight, eps, scale=scale, next_weight=next_weight,
                                          next_eps=next_eps)
    from florenz_kernels.rms_norm import add_rms_norm as kernel

    return kernel(residual, y, weight, eps, scale=scale, next_weight=next_weight, next_eps=next_eps)


def _geglu_triton(gate, up):
    if not _kernels_run_on(gate, up) or gate.dtype != up.dtype or gate.shape != up.shape:
        return ref.geglu_reference(gate, up)
    from florenz_kernels.geglu import geglu as kernel

    return kernel(gate, up)


def _rope_triton(q, k, cos, sin):
    if not _kernels_run_on(q, k, cos, sin) or q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        return ref.rope_full_reference(q, k, cos, sin)
    from florenz_kernels.rope import rope_ as kernel

    half = q.shape[-1] // 2
    return kernel(q, k, cos[:, 0, :, :half], sin[:, 0, :, :half])


def _linear_cross_entropy_triton(hidden, weight, labels, *, softcap, ignore_index, z_loss, reduction,
                                 check_labels=True):
    from florenz_kernels.linear_cross_entropy import linear_cross_entropy as kernel

    return kernel(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index, z_loss=z_loss,
                  reduction=reduction, check_labels=check_labels)


def _image_tokens_triton(x_BNC, pos_NC, weight_dC, ln_weight, ln_bias, eps):
    if not triton_runs_on(x_BNC):
        return ref.image_tokens_reference(x_BNC, pos_NC, weight_dC, ln_weight, ln_bias, eps)
    from florenz_kernels.image_tokens import image_tokens as kernel

    return kernel(x_BNC, pos_NC, weight_dC, ln_weight, ln_bias, eps)


if _triton_importable():
    register_backend("triton", _attention_triton)
    for _op, _fn in (("rms_norm", _rms_norm_triton), ("add_rms_norm", _add_rms_norm_triton),
                     ("geglu", _geglu_triton), ("rope", _rope_triton),
                     ("linear_cross_entropy", _linear_cross_entropy_triton), ("image_tokens", _image_tokens_triton)):
        register_backend("triton", _fn, op=_op)
