"""The end-to-end benchmark's pieces: the analytic FLOP count against torch's FlopCounterMode, and a short CPU run
of bench/throughput.py that writes a valid report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz
from florenz_fast.metrics import forward_flops_per_sample, train_flops_per_sample

ROOT = Path(__file__).resolve().parents[1]


def _throughput_module():
    """bench/throughput.py, loaded by file path (bench/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("florenz_bench_throughput", ROOT / "bench" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass (ThroughputConfig) looks its module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
@pytest.mark.parametrize("prompt,target", [(12, 9), (3, 30)])
def test_analytic_flops_match_flop_counter(preset, prompt, target, one_intra_op_thread):
    torch.manual_seed(0)
    cfg = get_config(preset)
    model = Florenz(cfg).eval()
    px = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(px, torch.randint(3, 100, (1, prompt)), torch.randint(3, 100, (1, target)))
    counted = counter.get_total_flops()
    executed = sum(forward_flops_per_sample(model, cfg, prompt, target, convention="executed").values())
    assert abs(executed - counted) <= 0.05 * counted, (executed, counted)
    # the MFU convention counts less (half the causal square, no window padding), never more
    useful = sum(forward_flops_per_sample(model, cfg, prompt, target).values())
    assert useful < executed
    # training: forward + 2x forward through the parts that train
    f = forward_flops_per_sample(model, cfg, prompt, target)
    assert train_flops_per_sample(model, cfg, prompt, target) == pytest.approx(
        sum(f.values()) + 2 * (f["encoder"] + f["decoder"]))


def test_flop_convention_is_checked():
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="convention must be 'model' or 'executed'"):
        forward_flops_per_sample(Florenz(cfg), cfg, 3, 3, convention="useful")


@pytest.mark.slow
def test_short_cpu_run_writes_a_valid_report(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--preset=tiny", "--samples=8", "--batch=4",
           "--repeats=1", "--mode=train", "--train_configs=published,dense", "--threads=1", "--sweep_batches=2",
           f"--out={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    throughput = _throughput_module()
    throughput.validate_report(report)  # raises on a missing or mistyped field
    rows = {r["config"]: r for r in report["train"]["rows"]}
    assert set(rows) == {"published", "dense"}
    assert rows["published"]["collation"] == "padded" and rows["dense"]["collation"] == "packed"
    for r in rows.values():
        assert r["samples"] == 8 and r["tokens_per_s"] > 0 and r["first_batch_loss_diff"] <= 1e-4
    assert rows["published"]["speedup_vs_published"] == 1.0
    assert rows["dense"]["syncs_per_step"] == 0  # the engine's step reads nothing back (the emulation does)
    assert rows["published"]["syncs_per_step"] > 0
    # the batch sweep: batch 2 and the main run's batch 4, same configs, each row timed
    sweep = report["train_sweep"]
    assert [t["batch"] for t in sweep] == [2, 4] and sweep[1]["rows"] == report["train"]["rows"]
    assert [r["config"] for r in sweep[0]["rows"]] == ["published", "dense"]
    assert sweep[0]["rows"][0]["steps"] == 4 and all(r["tokens_per_s"] > 0 for r in sweep[0]["rows"])
    md = (tmp_path / "throughput.md").read_text()
    assert md.startswith("# Throughput") and "## Training vs batch size" in md
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    broken = dict(report, train=dict(report["train"], rows=[dict(report["train"]["rows"][0], median_s="fast")]))
    with pytest.raises(ValueError, match="median_s is str"):
        throughput.validate_report(broken)


@pytest.mark.slow
def test_scaling_estimate_is_labelled_and_consistent(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--scaling", f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    sc = json.loads((tmp_path / "throughput.json").read_text())["scaling"]
    assert "estimate" in sc["assumptions"]["note"] and all(r["estimate"] for r in sc["rows"])
    one = {(r["preset"], r["mode"]): r for r in sc["rows"] if r["gpus"] == 1}
    for r in sc["rows"]:  # more GPUs: less compute per GPU, never a higher MFU than one GPU
        base = one[(r["preset"], r["mode"])]
        assert r["compute_s"] == pytest.approx(base["compute_s"] / r["gpus"])
        assert r["mfu"] <= base["mfu"] + 1e-12
    assert "ESTIMATE" in (tmp_path / "throughput.md").read_text()


def test_generation_bench_reports_the_cpu_gemm_roof(tmp_path):
    """bench/generate.py on the CPU: each mode's matmul FLOPs and fraction of the measured GEMM roof, and the
    speed-up bound those FLOPs set (uncached time over the cached FLOPs at the roof)."""
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--preset=tiny", "--batch=2", "--beams=2",
           "--new-tokens=4", "--compile=off", "--repeats=1", "--threads=1", f"--out={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((tmp_path / "generate_tiny_cpu.json").read_text())["results"][0]
    cached, uncached = row["cached"], row["uncached (published)"]
    assert cached["tokens_identical_to_cached"] and uncached["tokens_identical_to_cached"]
    # the uncached path recomputes every position: more matmul work for the same tokens
    assert 0 < cached["matmul_flops"] < uncached["matmul_flops"]
    for r in (cached, uncached):
        assert r["achieved_GFLOPs"] == pytest.approx(r["matmul_flops"] / r["total_s"] / 1e9)
        assert r["compute_fraction"] == pytest.approx(r["achieved_GFLOPs"] / row["gemm_roof_GFLOPs"])
        assert r["decode_s"] is None or 0 < r["decode_s"] < r["total_s"]
    assert row["speedup_bound"] == pytest.approx(
        uncached["total_s"] / (cached["matmul_flops"] / (row["gemm_roof_GFLOPs"] * 1e9)))
    assert "GEMM roof" in (tmp_path / "generate_tiny_cpu.md").read_text()
