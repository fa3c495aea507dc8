"""The CUDA extension florenz_fast._C: it loads on a machine without a GPU, registers its ops, and (static check)
its sm_90 / sm_80 cubins spill nothing to local memory. CI builds the extension (the Makefile sets
FLORENZ_REQUIRE_CUDA_EXT=1, so a missing build fails here instead of skipping)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

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
