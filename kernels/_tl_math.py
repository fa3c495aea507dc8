"""Triton device functions shared by the kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh_exp(x):
    """tanh without libdevice (the interpreter has none): (1 - e) / (1 + e) with e = exp(-2|x|), and below
    |x| = 0.125, where 1 - e cancels, the odd Taylor series to x^7 (fp32-accurate there)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    t = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    series = ax * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397)))
    t = tl.where(ax < 0.125, series, t)
    return tl.where(x < 0, -t, t)
