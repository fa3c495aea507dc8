"""Static GPU checks without a GPU: compile one Triton kernel for sm_80 / sm_90 and read its resources.

    compile_report(fn, ptr_types, float_args, constexprs, capability, num_warps, num_stages=1) -> dict

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` builds a real cubin on a CPU-only machine;
Triton's bundled cuobjdump reports registers, STACK / LOCAL bytes (spills) and shared memory, and the SASS
shows LDL/STL spill instructions. Needs the kernel module imported without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import triton


def cuobjdump() -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def compile_report(fn, ptr_types: dict[str, str], float_args: set[str], constexprs: dict, capability: tuple[int, int],
                   num_warps: int, num_stages: int = 1) -> dict:
    """ptr_types: pointer argument -> Triton element type ("bf16", "fp32", "i64", ...); float_args: fp32 scalars;
    every other non-constexpr argument is an i32 scalar."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("static checks need the compiled (non-interpreted) kernels: unset TRITON_INTERPRET")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in float_args:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    report = {"kernel": fn.__name__, "sm": target.arch, "num_warps": num_warps, "shared": compiled.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuobjdump(), "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    report.update(registers=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)),
                  spill_insts=len(re.findall(r"\b(?:LDL|STL)\b", sass)))
    return report
