"""Static GPU checks without a GPU, shared by the kernel test modules: run a script that compiles kernels for
sm_80 / sm_90 (florenz_kernels._static) in a subprocess without TRITON_INTERPRET and return its JSON reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.helpers.ci import skip_or_fail

# Appended to a script that defines `jobs` (a list) and `one(job) -> dict`: runs the compiles in worker processes
# (one per core, at most 4) and prints their reports as one JSON list.
_POOL = r"""
from concurrent.futures import ProcessPoolExecutor as _Pool
import json as _json
with _Pool(int(sys.argv[1])) as _ex:
    print(_json.dumps(list(_ex.map(one, jobs))))
"""


def compile_reports(script: str, timeout: int = 1800, pool: bool = False) -> list[dict]:
    """Skips the test when triton's bundled cuobjdump is missing (fails instead under CI=true: tests/helpers/ci.py);
    the script prints one JSON list last, or, with `pool`, defines `jobs` and `one` and the compiles run in parallel
    (see _POOL)."""
    from florenz_kernels._static import cuobjdump

    if not os.path.exists(cuobjdump() or ""):
        skip_or_fail("no cuobjdump (triton's bundled one is missing)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [str(max(1, min(4, os.cpu_count() or 1)))] if pool else []
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", "import sys\n" + script + (_POOL if pool else ""), *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    reports = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"static checks: {len(reports)} compiles in {time.time() - t0:.0f} s")
    return reports
