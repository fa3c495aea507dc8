"""Static GPU checks without a GPU, shared by the kernel test modules: run a script that compiles kernels for
sm_80 / sm_90 (florenz_kernels._static) in a subprocess without TRITON_INTERPRET and return its JSON reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


def compile_reports(script: str, *args: str, timeout: int = 1800) -> list[dict]:
    """Skips the test when triton's bundled cuobjdump is missing; the script prints one JSON list last."""
    from florenz_kernels._static import cuobjdump

    if not os.path.exists(cuobjdump() or ""):
        pytest.skip("no cuobjdump (triton's bundled one is missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"static checks: {len(reports)} compiles in {time.time() - t0:.0f} s")
    return reports
