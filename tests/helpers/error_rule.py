"""The kernels' error rule (DESIGN.md 3, flash-attention's), one definition for every test that uses it.

A fast path's max error against the float64 reference must be within 2x the max error of the same reference
computed in the fast path's dtype, plus a slack that each caller states and justifies: `ulps` fp32 ulps at the
tensor's scale (max(1, max|ref|)), which only matters in fp32, where both errors sit at rounding level and the 2x
rule alone compares two summation orders; or an absolute `atol` / a relative-to-scale `rtol` where a test has
always used one. Default: no slack at all.
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


def max_error(a: torch.Tensor, ref64: torch.Tensor) -> float:
    """max |a - ref64|, in float64 on ref64's device."""
    return (a.double().to(ref64.device) - ref64.double()).abs().max().item()


def _check(ours, ref64, ref_low, ulps, atol, rtol) -> tuple[bool, float, float, float]:
    err, err_low = max_error(ours, ref64), max_error(ref_low, ref64)
    s = atol + (slack(ref64, ours.dtype, ulps) if ulps else 0.0)
    if rtol:
        s += rtol * max(1.0, ref64.abs().max().item())
    return err <= 2 * err_low + s, err, err_low, s


def within_2x(ours, ref64, ref_low, *, ulps: float = 0.0, atol: float = 0.0, rtol: float = 0.0) -> bool:
    """The rule as a boolean (for `assert a and b`); shapes must match."""
    if ours.shape != ref64.shape:
        return False
    return ref64.numel() == 0 or _check(ours, ref64, ref_low, ulps, atol, rtol)[0]


def assert_within_2x(ours, ref64, ref_low, what="", *, ulps: float = 0.0, atol: float = 0.0, rtol: float = 0.0):
    assert ours.shape == ref64.shape, (what, ours.shape, ref64.shape)
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    if ref64.numel() == 0:
        return
    ok, err, err_low, s = _check(ours, ref64, ref_low, ulps, atol, rtol)
    assert ok, f"{what}: error {err:.3g} > 2 x {err_low:.3g} (+ slack {s:.2g})"
