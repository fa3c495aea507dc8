"""The CUDA extension florenz_fast._C: it loads on a machine without a GPU, registers its ops, and (static check)
its sm_90 / sm_80 cubins spill nothing to local memory. CI builds the extension (the Makefile sets
FLORENZ_REQUIRE_CUDA_EXT=1, so a missing build fails here instead of skipping)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from florenz_fast import ops

REQUIRED = os.environ.get("FLORENZ_REQUIRE_CUDA_EXT") == "1"
needs_ext = pytest.mark.skipif(not REQUIRED and not ops.extension_available(), reason=ops.extension_status()[1])


@needs_ext
def test_extension_loads_and_registers_ops():
    loaded, message = ops.extension_status()
    assert loaded, message
    for name in ("decode_attention", "cross_decode_attention", "rope_kv_append"):
        schema = str(getattr(torch.ops.florenz, name).default._schema)
        assert schema.startswith(f"florenz::{name}(Tensor q"), schema
    assert "Tensor(a!) k_cache" in str(torch.ops.florenz.rope_kv_append.default._schema)


def resource_usage(path: str) -> dict[str, list[tuple[str, dict[str, int]]]]:
    """{arch: [(kernel, {"REG":.., "STACK":.., "SHARED":.., "LOCAL":..})]} from cuobjdump --dump-resource-usage."""
    from florenz_kernels._static import cuobjdump

    text = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                          check=True).stdout
    out: dict[str, list] = {}
    arch, fn = None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn:
            vals = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))
            out.setdefault(arch, []).append((fn, vals))
            fn = None
    return out


@needs_ext
def test_cubins_do_not_spill():
    path = importlib.util.find_spec("florenz_fast._C").origin
    usage = resource_usage(path)
    if "sm_90" not in usage and not REQUIRED:  # built with another TORCH_CUDA_ARCH_LIST by hand
        pytest.skip(f"the extension has no sm_90 cubins (archs: {sorted(usage)})")
    kernels = usage.get("sm_90", [])
    # 18 split kernels (2 dtypes x 3 head dims x 3 row tiles), 2 combine kernels, 2 RoPE/append kernels
    assert len(kernels) == 22, [k for k, _ in kernels]
    for arch, entries in usage.items():
        for name, vals in entries:
            assert vals["LOCAL"] == 0 and vals["STACK"] == 0, f"{arch} {name} spills: {vals}"


def _toolkit() -> str | None:
    """The CUDA toolkit the build uses: $CUDA_HOME, else the pip cuda-toolkit wheels (site-packages/nvidia/cuNN)."""
    import sysconfig

    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    root = os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu" + (torch.version.cuda or "").split(".")[0])
    return root if os.path.exists(os.path.join(root, "bin", "nvcc")) else None


@pytest.mark.slow
@pytest.mark.skipif(not REQUIRED and not (torch.version.cuda and _toolkit() and shutil.which("cmake")),
                    reason="no CUDA torch, CUDA toolkit or cmake")
def test_cmake_builds_the_standalone_library(tmp_path):
    # README's C++ build: `cmake -S . -B build && cmake --build build`, here with the pip toolkit (the CMakeLists
    # handles its lib/ layout and versioned libcudart); the library registers the same ops, its CPU kernels agree
    # with the float64 reference, and its cubins are sm_80 + sm_90 without spills, like the extension's
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = tmp_path / "build"
    env = dict(os.environ, CUDA_HOME=_toolkit())
    configure = subprocess.run(["cmake", "-S", root, "-B", str(build),
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                               capture_output=True, text=True, env=env, timeout=600)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env,
                              timeout=1200)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    lib = build / "libflorenz_decode.so"
    script = f"""
import torch
torch.ops.load_library({str(lib)!r})
from florenz_fast import ops
g = torch.Generator().manual_seed(0)
q = torch.randn(3, 4, 2, 64, generator=g, dtype=torch.float64)
k, v = (torch.randn(3, 2, 16, 64, generator=g, dtype=torch.float64) for _ in range(2))
lens = torch.tensor([2, 9, 40], dtype=torch.int32)  # 40 > 16 slots: a wrapped ring with a window
out = torch.ops.florenz.decode_attention(q, k, v, lens, 0.125, 50.0, 12)
ref = ops.decode_attention_reference(q, k, v, lens, scale=0.125, softcap=50.0, window=12)
print((out - ref).abs().max().item())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-12
    usage = resource_usage(str(lib))
    assert sorted(usage) == ["sm_80", "sm_90"], sorted(usage)
    for arch, entries in usage.items():
        assert len(entries) == 22, (arch, [k for k, _ in entries])
        for name, vals in entries:
            assert vals["LOCAL"] == 0 and vals["STACK"] == 0, f"{arch} {name} spills: {vals}"
