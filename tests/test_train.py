"""The training engine on the CPU: the default run learns, activation checkpointing changes nothing, resume is
exact (also after a kill during a checkpoint write), and DDP / FSDP2 over two gloo processes match one process
with gradient accumulation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from florenz_fast.config import get_config
from florenz_fast.convert import load_pretrained
from florenz_fast.distributed import apply_activation_checkpointing
from florenz_fast.florenz import Florenz
from florenz_fast.train import parse_args, train
from florenz_fast.train_state import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
# small and quick: 32 synthetic images, a few steps; dropout and drop-path off where runs must agree exactly
QUICK = ["--data.synthetic_images=32", "--data.max_encoder_tokens=200", "--data.max_decoder_tokens=96",
         "--data.batch_size=8", "--log_every=1000"]
NO_DROPOUT = ["--model.encoder.dropout=0", "--model.vision.drop_path=0"]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_default_recipe_learns(tmp_path):
    cfg = parse_args([f"--out={tmp_path}", "--steps=60", "--data.synthetic_images=64", "--save_every=1000"])
    summary = train(cfg)
    losses = summary["losses"]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5  # falls by 30 % or more in 60 steps (6.25 -> 3.9)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    model = load_pretrained(tmp_path / "final")
    assert model.cfg == cfg.model
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"caption-en", "caption-de", "translate-fr"} <= set().union(*(r["loss_by_key"] for r in records))
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 for r in records)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(policy):
    torch.manual_seed(0)
    ref = Florenz(get_config("tiny")).train()
    ckpt = copy.deepcopy(ref)
    apply_activation_checkpointing(ckpt, policy)
    assert type(ckpt.decoder.layers[0]).__name__ == "CheckpointWrapper"
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    prompt = torch.randint(3, 512, (2, 7), generator=g)
    dec = torch.randint(3, 512, (2, 9), generator=g)
    losses, grads = [], []
    for model in (ref, ckpt):
        torch.manual_seed(123)  # same dropout masks; checkpointing must replay them in the recomputation
        loss = model(pixels, prompt, dec, labels=dec).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()
                      if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=0, atol=1e-7), name
    # the state dict keeps its names (checkpoints stay loadable either way)
    assert ckpt.state_dict().keys() == ref.state_dict().keys()


def test_selective_checkpointing_saves_the_triton_attention_forward(monkeypatch):
    # The `triton` backend's attention forward is on the save list: under the selective policy the backward reads
    # its saved (out, lse) instead of running the kernel's forward again.
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from florenz_fast.distributed import _selective_policy
    from florenz_kernels import softcap_attention as sa
    from tests.triton_interpreter import DEVICE  # first: switches the interpreter on without CUDA

    assert _selective_policy(None, torch.ops.florenz.softcap_attention_fwd.default) == CheckpointPolicy.MUST_SAVE
    assert _selective_policy(None, torch.ops.aten.exp.default) == CheckpointPolicy.PREFER_RECOMPUTE
    calls = []
    forward = sa._forward
    monkeypatch.setattr(sa, "_forward", lambda *args: calls.append(1) or forward(*args))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))

    def layer(q, k, v):
        return sa.softcap_attention(q, k, v, softcap=5.0)[0].sin()

    for policy, runs in ((_selective_policy, 1), (lambda ctx, op, *a, **kw: CheckpointPolicy.PREFER_RECOMPUTE, 2)):
        calls.clear()
        out = checkpoint(layer, q, k, v, use_reentrant=False,
                         context_fn=lambda: create_selective_checkpoint_contexts(policy))
        out.sum().backward()
        assert len(calls) == runs  # 2: the recompute-everything policy runs the forward kernel again in backward


def test_resume_is_exact(tmp_path):
    args = QUICK + ["--steps=8", "--save_every=4"]
    train(parse_args(args + [f"--out={tmp_path / 'whole'}"]))
    first = train(parse_args(args + [f"--out={tmp_path / 'split'}", "--stop_at=4"]))
    assert first["end_step"] == 4 and latest_checkpoint(tmp_path / "split").name == "step-000004"
    second = train(parse_args(args + [f"--out={tmp_path / 'split'}"]))
    assert second["start_step"] == 4
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")  # bit-identical curve
    a = load_pretrained(tmp_path / "whole" / "final").state_dict()
    b = load_pretrained(tmp_path / "split" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    from florenz_fast import train_state
    original, calls = dcp.save, []
    def save_then_die(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)           # the tensors of this checkpoint are written (into step-*.tmp) ...
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)   # ... and the process dies before it is complete
    train_state.dcp.save = save_then_die
    from florenz_fast.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    args = QUICK + ["--steps=6", "--save_every=3"]
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    run = subprocess.run([sys.executable, str(script), *args, f"--out={tmp_path / 'killed'}"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "step-000006.tmp").is_dir()  # the half-written one is there ...
    assert latest_checkpoint(tmp_path / "killed").name == "step-000003"  # ... and not what latest names
    train(parse_args(args + [f"--out={tmp_path / 'killed'}"]))  # resumes from step 3
    train(parse_args(args + [f"--out={tmp_path / 'clean'}"]))
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "clean")
    assert not (ckpts / "step-000006.tmp").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_accumulation(tmp_path, parallel):
    args = QUICK + NO_DROPOUT + ["--steps=3", "--save_every=1000"]
    train(parse_args(args + ["--grad_accum=2", f"--out={tmp_path / 'single'}"]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "florenz_fast/train.py", *args, f"--parallel={parallel}", f"--out={tmp_path / parallel}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single, multi = _losses(tmp_path / "single"), _losses(tmp_path / parallel)
    assert len(single) == len(multi) == 3
    assert max(abs(a - b) for a, b in zip(single, multi)) <= 1e-5
    a = load_pretrained(tmp_path / "single" / "final").state_dict()
    b = load_pretrained(tmp_path / parallel / "final").state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    torch.manual_seed(0)  # the runs' initial weights (seed 0), to show that training moved them
    init = Florenz(parse_args(args).model).state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-4  # 3 warm-up steps move weights ~6e-4


def test_no_vision_trains_all_but_the_image_path(tmp_path):
    # trainable=no_vision: from scratch, the vision tower and image-token pipeline stay at their init
    from florenz_fast.florenz import IMAGE_PATH

    cfg = parse_args([f"--out={tmp_path}", "--steps=3", "--trainable=no_vision", "--save_every=1000", *QUICK])
    summary = train(cfg)
    torch.manual_seed(cfg.seed)
    init = Florenz(copy.deepcopy(cfg.model)).state_dict()
    final = load_pretrained(tmp_path / "final").state_dict()
    frozen = [k for k in init if k.startswith(IMAGE_PATH)]
    assert frozen and all(torch.equal(init[k], final[k]) for k in frozen)
    moved = [k for k in init if k.endswith(".weight") and not k.startswith(IMAGE_PATH)
             and not torch.equal(init[k], final[k])]
    assert any(k.startswith("encoder.") for k in moved) and any(k.startswith("decoder.") for k in moved)
    assert len(summary["losses"]) == 3


def test_bad_arguments():
    with pytest.raises(KeyError, match="unknown recipe 'pretrain'"):
        parse_args(["--recipe=pretrain"])
    with pytest.raises(ValueError, match="precision must be one of"):
        parse_args(["--precision=fp8"])
    with pytest.raises(ValueError, match="unknown key 'lrr'"):
        parse_args(["--optim.lrr=1"])
    cfg = parse_args(["--optim.lr=5e-4", "--recipe=cpt", "--preset=florenz-11.2b"])
    assert cfg.recipe == "cpt" and cfg.model.name == "florenz-11.2b" and cfg.model.image_size == 224
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.01 and cfg.precision == "fp16"
