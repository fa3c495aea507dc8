"""Static GPU checks without a GPU: compile a Triton kernel for sm_80 / sm_90 here and read its cubin.

    compile_report(fn, constexprs, arg_type, aligned, capability, num_warps, num_stages) -> dict

`arg_type(name)` gives each runtime argument's Triton type ("*bf16", "*fp32", "i32", "fp32", ...), `aligned(name)`
whether it is marked 16-divisible (pointers and leading strides, as the launches make them). The report:
registers, stack and local bytes (spills), shared bytes, HGMMA / HMMA instruction counts (tensor cores on sm_90 /
sm_80) and LDL/STL spill instructions, read with the cuobjdump that ships inside the triton package. Needs the
kernel module imported without TRITON_INTERPRET (tests run this in a subprocess).
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


def compile_report(fn, constexprs: dict, arg_type, aligned, capability: tuple[int, int], *, num_warps: int,
                   num_stages: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_report needs the compiled (non-interpreted) kernels: unset TRITON_INTERPRET")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr or name in constexprs:
            if name in constexprs:
                signature[name] = "constexpr"
                consts[name] = constexprs[name]
            continue
        signature[name] = arg_type(name)
        if aligned(name):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    compiled = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([cuobjdump(), "--dump-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    return {"kernel": fn.__name__, "sm": target.arch, "shared": compiled.metadata.shared, "registers": int(m.group(1)),
            "stack": int(m.group(2)), "local": int(m.group(4)), "raw": res.strip(), "hgmma": sass.count("HGMMA"),
            "hmma": sass.count("HMMA"), "spill_insts": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
            "num_warps": num_warps}
