"""Training checkpoints: atomic, resumable, the same code for one process, DDP and FSDP2.

Layout under <out>/checkpoints/:
    step-000100/            torch.distributed.checkpoint of {"model", "optim"} (sharded under FSDP2)
        train_state.json    step, scheduler, data-loader position, GradScaler, per-rank RNG states
    latest                  text file naming the newest complete step directory

A checkpoint is written into `step-XXXXXX.tmp/` and renamed into place only when every rank has finished;
`latest` is then replaced atomically. A run killed at any moment leaves `latest` pointing at a complete
checkpoint (a stale `.tmp` directory is removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .distributed import World

LATEST = "latest"


def _barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _gather_json(obj, world: World) -> list:
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(root: Path, step: int, model, optimizer, *, world: World, train_state: dict,
                    keep: int = 2) -> Path:
    """Write step `step` atomically; `train_state` must be JSON-serialisable (rank-0's copy is kept)."""
    ckpt_dir = root / "checkpoints"
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f"step-{step:06d}.tmp"
    if world.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(world)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    rngs = _gather_json(rng_state(), world)
    if world.main:
        state = dict(train_state, step=step, world_size=world.size, rng=rngs)
        (tmp / "train_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = ckpt_dir / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        os.replace(pointer, ckpt_dir / LATEST)
        # keep the newest `keep` complete checkpoints; stale .tmp directories of killed runs go too
        done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(world)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = root / "checkpoints" / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path: Path, model, optimizer, *, world: World) -> dict:
    """Restore model, optimizer and this rank's RNG in place; returns the train_state dict."""
    state = json.loads((path / "train_state.json").read_text())
    if state["world_size"] != world.size:
        raise ValueError(f"{path} was written by {state['world_size']} processes, this run has {world.size}: "
                         "exact resume needs the same world size")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    set_rng_state(state["rng"][world.rank])
    return state


def full_model_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on the CPU, for the safetensors export (collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
