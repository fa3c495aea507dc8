"""bench/gpu_suite.sh runs on a lent GPU only; here its control flow is checked with a stand-in interpreter
(PYTHON=true: every step "succeeds" at once), its budget logic with a budget too small for any step, and that every
command it runs names options its benchmark actually has."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
STEPS = ["build_ext", "pytest_gpu", "bench_attention", "bench_attention_hopper", "bench_decode", "train_0.4b",
         "train_3.5b", "generate_3.5b"]


def _run(tmp_path, **env):
    out = tmp_path / "results"
    r = subprocess.run(["bash", str(SUITE)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": "true", "RESULTS": str(out), **env})
    return r, out


def test_every_step_runs_and_is_logged(tmp_path):
    r, out = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.txt").read_text()
    for name in STEPS:
        assert f"OK       {name}" in summary and (out / f"{name}.log").exists()
    assert (out / "environment.txt").exists()


def test_a_spent_budget_skips_and_says_so(tmp_path):
    r, out = _run(tmp_path, SUITE_BUDGET_S="5")
    summary = (out / "summary.txt").read_text()
    assert all(f"SKIPPED  {name}" in summary for name in STEPS)


def test_a_failing_step_is_counted(tmp_path):
    r, out = _run(tmp_path, PYTHON="false")
    assert r.returncode == len(STEPS)
    assert (out / "summary.txt").read_text().count("FAILED") == len(STEPS)


def test_the_benchmarks_know_the_options_the_suite_passes():
    text = SUITE.read_text()
    for script in ("bench_attention.py", "bench_decode.py", "throughput.py", "generate.py"):
        src = (ROOT / "bench" / script).read_text()
        calls = re.findall(rf"bench/{re.escape(script)}((?:[^\n]|\\\n)*)", text)
        assert calls, script
        for call in calls:
            for opt in re.findall(r"--([a-z][a-z0-9_-]*)", call):
                # argparse options appear as "--opt" in the script; throughput.py's are ThroughputConfig fields
                assert f'"--{opt}"' in src or re.search(rf"^\s+{opt.replace('-', '_')}\s*:", src, re.M), (script, opt)
