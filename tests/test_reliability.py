"""Failure behaviour of the training engine (issue 17): a diverging run skips its non-finite steps, stops after
`max_bad_steps` of them with a clear error, never writes non-finite weights and never rotates the last good
checkpoint out; metrics.jsonl stays strict JSON; a write that fails at any file of a checkpoint or an export
leaves the previous one whole and names the file."""

from __future__ import annotations

import builtins
import errno
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.utils._python_dispatch import TorchDispatchMode

from florenz_fast import checkpoint as ckpt_io
from florenz_fast.checkpoint import CheckpointWriteError, open_checkpoint, save_state_dict
from florenz_fast.distributed import World
from florenz_fast.metrics import MetricsWriter, plot_losses, sparkline
from florenz_fast.train import _guarded_step, _Health, lr_lambda, main, parse_args, train
from florenz_fast.train_state import NonFiniteWeightsError, latest_checkpoint, save_checkpoint

QUICK = ["--data.synthetic_images=32", "--data.max_encoder_tokens=200", "--data.max_decoder_tokens=96",
         "--data.batch_size=8", "--log_every=1000"]
# cosine "decay" to 1e14 x lr after one warm-up step: steps 1-2 at lr 2e-3, then ~6e8 at step 3 (30 steps)
DIVERGE = ["--optim.warmup_steps=1", "--optim.min_lr_ratio=1e14"]
ONE = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))


def _strict_records(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"{path}: bare {name} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a training checkpoint (dcp format), read back without a model."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(dest))
    state = torch.load(dest, weights_only=True)
    dest.unlink()
    return state["model"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    """Two ordinary steps of the tiny recipe: checkpoint step-000002 and a final export, both good."""
    out = tmp_path_factory.mktemp("good") / "run"
    train(parse_args(QUICK + ["--steps=2", "--save_every=2", f"--out={out}"]))
    return out


def test_divergence_skips_stops_and_keeps_the_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    # steps 1-2 train normally, step 3 makes a huge update (the schedule's lr jumps from 2e-3 to ~6e8), steps 4-6
    # are non-finite and skipped, and max_bad_steps=3 stops the run at step 6; keep_checkpoints=1 would rotate
    # the last good checkpoint (step-000002) out at the next save without its protection
    rc = main(QUICK + DIVERGE + ["--steps=30", "--save_every=1", "--keep_checkpoints=1", "--max_bad_steps=3",
                                 f"--out={out}"])
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    message = errors[0]
    good = out / "checkpoints" / "step-000002"
    assert "diverged at step 6" in message and "3 consecutive steps (4-6)" in message
    assert "weights as after step 3" in message and f"last good checkpoint: {good}" in message
    assert "learning rate too high (optim.lr=0.002; 5.8" in message and "at step 3, the last update" in message

    records = _strict_records(out / "metrics.jsonl")  # strict JSON: the NaN losses are null
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in records] == [False, False, False, True, True, True]
    assert [r["loss"] is None for r in records] == [False, False, False, True, True, True]
    assert records[-1]["skipped_steps"] == 3

    # the good checkpoint survived rotation, `latest` names a complete one, every kept checkpoint is finite
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000002", "step-000005"]
    assert latest_checkpoint(out).name == "step-000005"
    for name in kept:
        weights = _checkpoint_weights(out / "checkpoints" / name)
        assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), name
    state = json.loads((out / "checkpoints" / "step-000005" / "train_state.json").read_text())
    assert state["health"]["healthy"] is False and state["health"]["last_good"] == "step-000002"
    assert json.loads((good / "train_state.json").read_text())["health"]["healthy"] is True
    assert not (out / "final").exists()  # no export from a diverged run
    assert (out / "loss.png").stat().st_size > 1000  # the summary and the plot coped with the NaN losses
    assert "skipped steps: 3" in captured.out and "×××" in captured.out


def test_run_ending_on_a_bad_step_exports_nothing(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run / "final", out / "final")  # a good export from an earlier run, no checkpoints
    final_before = (out / "final" / "model.safetensors").read_bytes()
    # steps 1-2 normal, step 3 a huge update, step 4 non-finite: the run ends inside a bad streak shorter than
    # max_bad_steps, so it does not stop, but its weights must not replace the good export
    summary = train(parse_args(QUICK + DIVERGE + ["--steps=4", "--save_every=1000", f"--out={out}"]))
    captured = capsys.readouterr()
    assert summary["skipped_steps"] == 1 and summary["final"] is None and summary["diverged"] is None
    assert all(math.isfinite(x) for x in summary["losses"][:3]) and math.isnan(summary["losses"][3])
    assert "final export not written: the last 1 step(s)" in captured.err
    assert "skipped steps: 1" in captured.out and "×" in captured.out  # the sparkline marks the NaN step
    assert (out / "final" / "model.safetensors").read_bytes() == final_before
    _strict_records(out / "metrics.jsonl")


def test_a_resumed_run_follows_the_new_learning_rate(good_run, tmp_path, capsys):
    # the advice of the divergence error (rerun with a lower --optim.lr) must work: the scheduler's state
    # would otherwise restore the checkpoint's base rate
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    cfg = parse_args(QUICK + ["--steps=3", "--save_every=1000", "--optim.lr=1e-4", f"--out={out}"])
    train(cfg)
    assert "resumed with optim.lr=0.0001 (the checkpoint's run had 0.002)" in capsys.readouterr().out
    records = _strict_records(out / "metrics.jsonl")
    assert records[1]["lr"] == pytest.approx(2e-3 * lr_lambda(cfg.optim, 3)(2), rel=1e-12)  # the first run
    assert records[2]["lr"] == pytest.approx(1e-4 * lr_lambda(cfg.optim, 3)(3), rel=1e-12)


# ---- the skip itself ------------------------------------------------------------------------------------------

class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += "_local_scalar_dense" in str(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["fused", "foreach", "fp16"])
def test_guarded_step_skips_exactly_and_fused_reads_nothing(impl):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, fused=impl == "fused", foreach=impl != "fused")
    scaler = torch.amp.GradScaler("cpu", enabled=impl == "fp16", init_scale=4.0)

    def step(grads, ok):
        scaler.scale(sum((p * g).sum() for p, g in zip(params, grads))).backward()  # gradients: g (scaled)
        scaler.unscale_(opt)
        with _HostReads() as mode:
            applied = _guarded_step(opt, scaler, torch.tensor(ok))
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return bool(applied), mode.reads

    step([torch.ones(4, 3), torch.ones(3)], True)  # moments and step count are non-trivial before the skip
    before = ([p.detach().clone() for p in params], None,
              [opt.state[p]["exp_avg"].clone() for p in params], [opt.state[p]["exp_avg_sq"].clone() for p in params])
    applied, reads = step([torch.ones(4, 3), torch.full((3,), float("nan"))], False)  # a non-finite step
    assert not applied
    assert all(torch.equal(a, p) for a, p in zip(before[0], params))
    assert all(torch.equal(before[2][i], opt.state[p]["exp_avg"]) for i, p in enumerate(params))
    assert all(torch.equal(before[3][i], opt.state[p]["exp_avg_sq"]) for i, p in enumerate(params))
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
    if impl == "fused":
        assert reads == 0  # the flag reaches the kernel on the device: the host never waits for it
    # a finite loss with finite gradients is applied (fp16: the loss check alone skips even finite gradients)
    applied, _ = step([torch.ones(4, 3), torch.ones(3)], impl != "fp16")
    assert applied == (impl != "fp16")
    assert all(float(opt.state[p]["step"]) == (2 if impl != "fp16" else 1) for p in params)
    if impl == "fp16":
        assert scaler.get_scale() == 1.0  # backed off twice (4 -> 2 -> 1): once per skipped step


def test_health_confirms_a_checkpoint_only_after_a_finite_step():
    h = _Health(pending="step-000002")
    h.observe(3, loss_finite=True, applied=True, overflow_only=False)
    assert h.last_good == "step-000002" and h.pending is None
    h.pending = "step-000003"
    h.observe(4, loss_finite=False, applied=False, overflow_only=False)  # the weights of step 3 gave a NaN
    assert h.last_good == "step-000002" and h.pending is None and h.streak == 1 and h.streak_start == 4
    h.observe(5, loss_finite=True, applied=False, overflow_only=True)  # fp16 calibration: skipped, not bad
    assert h.skipped == 2 and h.streak == 1
    h.observe(6, loss_finite=True, applied=False, overflow_only=False)  # overflow at loss scale <= 1: bad
    assert h.streak == 2 and h.streak_start == 4 and h.last_update == 3
    h.observe(7, loss_finite=True, applied=True, overflow_only=False)
    assert h.streak == 0 and h.last_update == 7


# ---- metrics, summary, plot -----------------------------------------------------------------------------------

def test_metrics_are_strict_json_and_the_pictures_cope(tmp_path):
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    nan, inf = float("nan"), float("inf")
    records = [{"step": 1, "loss": 3.0, "grad_norm": 1.0, "loss_by_key": {"a": 3.0}, "skipped": False},
               {"step": 2, "loss": nan, "grad_norm": inf, "loss_by_key": {"a": nan}, "skipped": True, "x": [-inf]},
               {"step": 3, "loss": 2.0, "grad_norm": 1.0, "loss_by_key": {"a": 2.0}, "skipped": False}]
    for r in records:
        writer.write(r)
    back = _strict_records(tmp_path / "metrics.jsonl")
    assert back[1] == {"step": 2, "loss": None, "grad_norm": None, "loss_by_key": {"a": None}, "skipped": True,
                       "x": [None]}
    assert back[0] == records[0]
    assert sparkline([3.0, nan, 2.0, inf, None, 1.0]) == "█×▄××▁"
    assert sparkline([nan, nan]) == "××"
    assert len(sparkline([1.0, nan] * 40)) == 40 and set(sparkline([1.0, nan] * 40)) == {"×"}
    assert plot_losses(back, tmp_path / "loss.png").stat().st_size > 1000
    assert plot_losses(back[1:2], tmp_path / "all_bad.png").stat().st_size > 1000


# ---- no non-finite weights on disk ----------------------------------------------------------------------------

def _small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def test_non_finite_weights_are_never_written(tmp_path):
    model, opt = _small()
    save_checkpoint(tmp_path, 1, model, opt, world=ONE, train_state={})
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step-000002: 1 of 4 model tensors hold NaN or inf \(1.bias\)"):
        save_checkpoint(tmp_path, 2, model, opt, world=ONE, train_state={})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001"]
    save_state_dict({"w": torch.ones(2)}, tmp_path / "export")
    with pytest.raises(ValueError, match=r"1 of 2 floating-point tensors hold NaN or inf \('b'\)"):
        save_state_dict({"w": torch.zeros(2), "b": torch.tensor([1.0, float("inf")])}, tmp_path / "export",
                        require_finite=True)
    assert torch.equal(open_checkpoint(tmp_path / "export")["w"], torch.ones(2))


def test_rotation_keeps_protected_checkpoints(tmp_path):
    model, opt = _small()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, world=ONE, train_state={}, keep=2, protect=["step-000002"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-000002", "step-000004", "step-000005"]


# ---- write failures at every file -----------------------------------------------------------------------------

class _FullDisk:
    """Fails the k-th file written (1-based; 0 = none): open() for writing, or a safetensors save_file. The
    failing file gets half of what was to be written, then ENOSPC, as a full disk does."""

    def __init__(self, monkeypatch, k: int):
        self.k, self.n, self.failed, self.paths = k, 0, None, []
        real_open, real_save = builtins.open, ckpt_io.save_file

        def count(path) -> bool:
            self.n += 1
            self.paths.append(str(path))
            if self.n == self.k:
                self.failed = str(path)
                return True
            return False

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax") and count(file):
                return _Failing(f)
            return f

        def fake_save(tensors, filename, metadata=None):
            if count(filename):
                with real_open(filename, "wb") as f:
                    f.write(b"\0" * 64)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(tensors, filename, metadata=metadata)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's Path.open (dcp's streams, write_text) calls io.open
        monkeypatch.setattr(ckpt_io, "save_file", fake_save)


class _Failing:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(bytes(data)[:max(1, len(data) // 2)] if not isinstance(data, str) else data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_checkpoint_write_failure_at_every_file_keeps_the_previous(tmp_path, monkeypatch):
    model, opt = _small()
    base = tmp_path / "base"
    save_checkpoint(base, 1, model, opt, world=ONE, train_state={"note": "one"})
    model(torch.randn(3, 4)).sum().backward()
    opt.step()  # step 2 differs from step 1
    with monkeypatch.context() as m:
        probe = _FullDisk(m, 0)
        save_checkpoint(tmp_path / "probe", 2, model, opt, world=ONE, train_state={})
    written = len(probe.paths)
    assert written >= 4, probe.paths  # dcp's data file(s) and .metadata, train_state.json, the `latest` pointer
    before = _tree(base)
    for k in range(1, written + 1):
        root = tmp_path / f"k{k}"
        shutil.copytree(base, root)
        with monkeypatch.context() as m:
            disk = _FullDisk(m, k)
            with pytest.raises(CheckpointWriteError) as info:
                save_checkpoint(root, 2, model, opt, world=ONE, train_state={})
        assert f"writing {disk.failed} failed" in str(info.value), (k, str(info.value))
        assert info.value.errno == errno.ENOSPC and "No space left on device" in str(info.value)
        assert _tree(root) == before, k  # step 1 and `latest` byte for byte, nothing of step 2 left behind
        save_checkpoint(root, 2, model, opt, world=ONE, train_state={})  # the run state allows a retry
        assert latest_checkpoint(root).name == "step-000002"
        assert torch.equal(_checkpoint_weights(root / "checkpoints" / "step-000002")["1.bias"], model[1].bias)


def test_export_write_failure_at_every_file_keeps_the_previous(tmp_path, monkeypatch):
    out = tmp_path / "final"
    old = {f"w{i}": torch.full((64,), float(i)) for i in range(4)}
    new = {k: v + 10 for k, v in old.items()}
    extra = {"config.json": '{"new": true}\n'}
    save_state_dict(old, out, max_shard_bytes=512, extra_files={"config.json": '{"old": true}\n'})
    before = _tree(tmp_path)
    with monkeypatch.context() as m:
        probe = _FullDisk(m, 0)
        save_state_dict(new, tmp_path / "probe", max_shard_bytes=512, extra_files=extra)
    assert len(probe.paths) == 4, probe.paths  # 2 shards, config.json, the index
    shutil.rmtree(tmp_path / "probe")
    for k in range(1, 5):
        with monkeypatch.context() as m:
            disk = _FullDisk(m, k)
            with pytest.raises(CheckpointWriteError) as info:
                save_state_dict(new, out, max_shard_bytes=512, extra_files=extra)
        assert disk.failed in str(info.value) and str(out / Path(disk.failed).name) in str(info.value)
        assert info.value.errno == errno.ENOSPC
        assert _tree(tmp_path) == before, k  # the old export, byte for byte, and no temporary directory
    save_state_dict(new, out, max_shard_bytes=512, extra_files=extra)
    assert torch.equal(open_checkpoint(out)["w3"], new["w3"]) and json.loads((out / "config.json").read_text())


def test_a_failed_checkpoint_write_stops_the_run_with_one_error_line(good_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    before = _tree(out / "checkpoints")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", no_space)
    rc = main(QUICK + ["--steps=3", "--save_every=1", f"--out={out}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1, err[-2000:]
    assert f"writing {out / 'checkpoints' / 'step-000003.tmp'} failed: No space left on device" in errors[0]
    assert _tree(out / "checkpoints") == before
