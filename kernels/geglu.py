"""GeGLU activation in Triton: gelu_tanh(gate) * up, forward and backward.

    geglu(gate, up) -> out          gate, up, out: same shape (..., F), fp16 / bf16 / fp32

Semantics (`geglu_reference`): out = F.gelu(gate, approximate="tanh") * up, i.e.
  gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), computed in fp32 from the inputs, the
  activation rounded to the input dtype before the product (as the eager model's two ops round it).
Backward: d gate = d out * up * gelu_tanh'(g), d up = d out * gelu_tanh(g), both recomputed from the saved
gate and up — the two inputs are all that is saved (the eager pair also keeps gelu(gate), one more F-wide
tensor per layer). Elementwise over the flattened tensors (made contiguous), one block per program.

Registered as torch.library ops `florenz::geglu_fwd` / `florenz::geglu_bwd` (fake implementations, autograd
via register_autograd). Set TRITON_INTERPRET=1 before importing on a CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._tl_math import tanh_exp
from .reference import geglu_reference

__all__ = ["geglu", "geglu_reference", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# (BLOCK, num_warps): 16-bit, fp32; checked by the static tests
GPU_CONFIGS = {2: (4096, 8), 4: (2048, 8)}
_CPU_CONFIG = (256, 4)


@triton.jit
def _fwd_kernel(G, U, O, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    t = tanh_exp(0.7978845608028654 * (g + 0.044715 * g * g * g))
    a = (0.5 * g * (1.0 + t)).to(O.dtype.element_ty).to(tl.float32)
    tl.store(O + offs, (a * u).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(DO, G, U, DG, DU, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    t = tanh_exp(0.7978845608028654 * (g + 0.044715 * g * g * g))
    a = 0.5 * g * (1.0 + t)
    # d gelu / d g = 0.5 (1 + t) + 0.5 g (1 - t^2) sqrt(2/pi) (1 + 3 c g^2)
    da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    # the eager order: d a = d out * up rounded to the dtype, then the gelu backward in fp32
    dgelu = (do * u).to(DG.dtype.element_ty).to(tl.float32)
    tl.store(DG + offs, (dgelu * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (do * a.to(DU.dtype.element_ty).to(tl.float32)).to(DU.dtype.element_ty), mask=mask)


def config_for(dtype: torch.dtype) -> tuple[int, int]:
    return _CPU_CONFIG if INTERPRET else GPU_CONFIGS[2 if torch.empty((), dtype=dtype).element_size() <= 2 else 4]


@torch.library.custom_op("florenz::geglu_fwd", mutates_args=())
def geglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    N = g.numel()
    if N:
        block, warps = config_for(g.dtype)
        _fwd_kernel[(triton.cdiv(N, block),)](g, u, out, N, BLOCK=block, num_warps=warps)
    return out


@geglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("florenz::geglu_bwd", mutates_args=())
def geglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    do, g, u = dout.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    N = g.numel()
    if N:
        block, warps = config_for(g.dtype)
        _bwd_kernel[(triton.cdiv(N, block),)](do, g, u, dg, du, N, BLOCK=block, num_warps=warps)
    return dg, du


@geglu_bwd.register_fake
def _(dout, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_formula(ctx, dout):
    gate, up = ctx.saved_tensors
    return geglu_bwd(dout, gate, up)


geglu_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU: F.gelu(gate, approximate="tanh") * up, elementwise, forward and backward in Triton.

    Args:
      gate: (...) fp16 / bf16 / fp32, any shape (made contiguous and flattened); the gelu input.
      up: same shape, dtype and device as gate.

    The activation is computed in fp32 from the inputs and rounded to the input dtype before the product (as
    the eager pair of ops rounds it).

    Returns:
      out, gate's shape and dtype (contiguous). Differentiable in gate and up; only gate and up are saved for the
      backward (gelu(gate) is recomputed).
    """
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"geglu: gate {tuple(gate.shape)} {gate.dtype} {gate.device} and up {tuple(up.shape)} "
                         f"{up.dtype} {up.device} must match")
    if gate.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"geglu: fp16/bf16/fp32 only, got {gate.dtype}")
    if gate.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("florenz geglu: CPU tensors need TRITON_INTERPRET=1 set before importing "
                           "florenz_kernels.geglu")
    return geglu_fwd(gate, up)


# ---- static checks (no GPU) ----------------------------------------------------------------------------------


def static_cases(dtype: str) -> list[dict]:
    """Compile jobs for kernels._static.compile_report: forward and backward at the config of `dtype`."""
    block, warps = GPU_CONFIGS[4 if dtype == "fp32" else 2]
    return [dict(fn=_fwd_kernel, num_warps=warps, float_args=set(), constexprs=dict(BLOCK=block),
                 ptr_types={n: dtype for n in ("G", "U", "O")}),
            dict(fn=_bwd_kernel, num_warps=warps, float_args=set(), constexprs=dict(BLOCK=block),
                 ptr_types={n: dtype for n in ("DO", "G", "U", "DG", "DU")})]
