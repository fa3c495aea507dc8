"""The kernels' error rule (DESIGN.md 3, flash-attention's), one definition for every kernel test module.

A fast path's max error against the float64 reference must be within 2x the max error of the same reference
computed in the fast path's dtype, plus a slack of fp32 ulps at the tensor's scale (max(1, max|ref|)). The slack
only matters in fp32, where both errors sit at rounding level and the 2x rule alone compares two summation
orders; each module states why its number of ulps is what it is.
"""

from __future__ import annotations

import torch


def slack(ref64: torch.Tensor, dtype: torch.dtype, ulps: float) -> float:
    """`ulps` fp32 ulps at the tensor's scale; a one-element result (a loss, a scale's gradient) also gets one ulp
    of its own dtype (its final rounding)."""
    if ref64.numel() == 0:
        return 0.0
    scale = max(1.0, ref64.abs().max().item())
    s = ulps * torch.finfo(torch.float32).eps * scale
    if ref64.numel() == 1:
        s += torch.finfo(dtype).eps * scale
    return s


def assert_within_2x(ours, ref64, ref_low, what="", *, ulps: float):
    assert ours.shape == ref64.shape, (what, ours.shape, ref64.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    if ref64.numel() == 0:
        return
    err = (ours.double() - ref64).abs().max().item()
    err_low = (ref_low.double() - ref64).abs().max().item()
    s = slack(ref64, ours.dtype, ulps)
    assert err <= 2 * err_low + s, f"{what}: error {err:.3g} > 2 x {err_low:.3g} (+ slack {s:.2g})"
