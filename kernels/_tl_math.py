"""Triton device functions shared by the kernels (jit helpers are inlined into their callers: no call at run time)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_exp(x):
    """tanh without libdevice or inline asm (the Triton interpreter has neither): (1 - e) / (1 + e) with
    e = exp(-2|x|), and below |x| = 0.125, where 1 - e cancels, the odd Taylor series to x^9.

    The one exp-formula tanh of the kernels (softcap attention's had the series to x^9, this module's to x^7; the
    more accurate one is kept). Measured in fp32 against float64 tanh (numpy's exp): on (0, 0.125) the truncated
    series is off by 8e-12 relative at 0.125 (x^7: 1.3e-9) and both evaluate within 1 ulp (max 0.99 ulp here, 1.02
    with x^7; they differ on 0.2 % of the inputs); above 0.125 the 1 - e cancellation costs up to 10 ulps (6.4e-7
    relative) on [0.125, 0.25), 5 ulps on [0.25, 0.5), under 2 ulps above 1. Large |x| cannot overflow (the exp
    argument is never positive): e underflows to 0 and t = 1 exactly (already from |x| = 9 in fp32, and for +-inf);
    NaN stays NaN.
    """
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t_big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    t_small = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(ax < 0.125, t_small, t_big)
    t = tl.where(x < 0.0, -t, t)
    return t


@triton.jit
def tanh(x, FAST: tl.constexpr):
    """tanh of fp32 x. FAST: `tanh.approx.f32`, one MUFU instruction with max relative error 2^-11 (what
    FlashAttention-2's softcap uses): GPU only (inline asm), and only where the input's own rounding dominates it
    (bf16 scores / logits: 2^-9). Otherwise tanh_exp (fp32-accurate, runs in the interpreter)."""
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        t = tanh_exp(x)
    return t
