"""Import this first in a test module that runs Triton kernels: on a machine without CUDA it switches the Triton
interpreter on (TRITON_INTERPRET=1) before any florenz_kernels module is imported.

Triton decides interpreted vs compiled when a function is decorated, its own jit'd stdlib (tl.zeros, tl.sum,
tl.max, ...) included. Earlier test modules import triton through transformers / torch._inductor, so in a
whole-suite run it is already loaded compiled-mode: it is re-imported fresh under the interpreter (the old module
objects stay with whoever holds them; nothing else here launches Triton kernels on the CPU). The interpreter's bf16
tl.dot is wrong (DESIGN.md), so CPU runs cover fp32 and fp16.
"""

from __future__ import annotations

import os
import sys

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
    if not any(m.startswith("florenz_kernels.") for m in sys.modules):
        for _name in [m for m in sys.modules if (m == "triton" or m.startswith("triton."))
                      and not m.startswith("triton._C")]:  # the C extension cannot load twice; it holds no jit
            del sys.modules[_name]
