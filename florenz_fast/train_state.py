"""Training checkpoints: atomic, resumable, the same code for one process, DDP and FSDP2.

Layout under <out>/checkpoints/:
    step-000100/            torch.distributed.checkpoint of {"model", "optim"} (sharded under FSDP2)
        train_state.json    step, scheduler, data-loader position, GradScaler, per-rank RNG states
    latest                  text file naming the newest complete step directory

A checkpoint is written into `step-XXXXXX.tmp/` and renamed into place only when every rank has finished;
`latest` is then replaced atomically. A run killed at any moment leaves `latest` pointing at a complete
checkpoint (a stale `.tmp` directory is removed by the next save).

Failures: weights holding a non-finite value are never written (NonFiniteWeightsError, before any file is
touched). A write that fails (ENOSPC, EACCES, ...) raises CheckpointWriteError naming the file, on every rank;
the partial `.tmp` directory is removed and `latest` still names the previous, complete checkpoint.
Rotation keeps the newest `keep` checkpoints and every directory named in `protect` (the loop passes its last
good one, so a diverging run cannot rotate the good checkpoints out).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .checkpoint import CheckpointWriteError, write_text_synced
from .distributed import World, all_reduce_sum

LATEST = "latest"


class NonFiniteWeightsError(ValueError):
    """The weights hold NaN or inf: writing them would replace good checkpoints with unusable ones."""


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


def nonfinite_tensors(state_dict: dict, world: World) -> list[str]:
    """Names of the floating-point tensors of `state_dict` holding a NaN or inf on any rank (collective: every
    rank passes the same keys, FSDP2 shards being checked where they live); one device->host read in all."""
    keys = [k for k, t in state_dict.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not keys:
        return []
    local = [t.to_local() if hasattr(t, "to_local") else t for t in (state_dict[k] for k in keys)]
    flags = torch.stack([(~torch.isfinite(t)).any().float() if t.numel() else t.new_zeros((), dtype=torch.float)
                         for t in local])
    flags = all_reduce_sum(flags.to(world.device), world).tolist()
    return [k for k, f in zip(keys, flags) if f]


def _all_ranks_raise(error: BaseException | None, world: World) -> None:
    """Raise `error` on every rank when any rank had one (a failure on rank 0 alone would otherwise leave the
    other ranks waiting in the next collective)."""
    messages = _gather_json(None if error is None else str(error), world)
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        if error is not None:
            raise error
        raise CheckpointWriteError(first)


class _PathNamingFileSystem(FileSystem):
    """dcp's local file system whose write errors name the file (ENOSPC from write() carries no file name)."""

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except OSError as e:
            raise CheckpointWriteError(e.errno, f"writing {path} failed: {e.strerror or e}", str(path)) from e


def _root_cause(exc: BaseException) -> BaseException:
    """The first rank's original exception inside dcp's CheckpointException (which carries tracebacks)."""
    if isinstance(exc, CheckpointException) and exc.failures:
        return next(iter(exc.failures.values()))[0]
    return exc


def save_checkpoint(root: Path, step: int, model, optimizer, *, world: World, train_state: dict,
                    keep: int = 2, protect: Iterable[str] = ()) -> Path:
    """Write step `step` atomically; `train_state` must be JSON-serialisable (rank-0's copy is kept).

    Raises NonFiniteWeightsError (nothing written) when a model tensor holds NaN or inf, and
    CheckpointWriteError (naming the file; previous checkpoints and `latest` untouched, the partial directory
    removed) when a write fails. Rotation keeps the newest `keep` checkpoints plus the directories in `protect`.
    """
    ckpt_dir = root / "checkpoints"
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f"step-{step:06d}.tmp"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bad = nonfinite_tensors(model_sd, world)
    if bad:
        raise NonFiniteWeightsError(
            f"not writing checkpoint {final}: {len(bad)} of {len(model_sd)} model tensors hold NaN or inf "
            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    error: BaseException | None = None
    if world.main:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as e:
            error = CheckpointWriteError(e.errno, f"cannot create {ckpt_dir}: {e.strerror or e}", str(ckpt_dir))
    _all_ranks_raise(error, world)
    writer = FileSystemWriter(str(tmp))
    writer.fs = _PathNamingFileSystem()
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), storage_writer=writer)
    except (OSError, CheckpointException) as e:  # dcp reports every rank's failure as a CheckpointException
        cause = _root_cause(e)
        if not isinstance(cause, OSError):
            raise  # not a write failure (a bug): the original traceback, not a disk message
        error = cause if isinstance(cause, CheckpointWriteError) else CheckpointWriteError(
            cause.errno, f"writing {cause.filename or tmp} failed: {cause.strerror or cause}", str(tmp))
    rngs = _gather_json(rng_state(), world)
    if world.main and error is None:
        error = _publish(ckpt_dir, tmp, final, dict(train_state, step=step, world_size=world.size, rng=rngs),
                         keep, set(protect))
    if error is not None and world.main:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial write took (ENOSPC: the disk is full)
    _all_ranks_raise(error, world)
    return final


def _publish(ckpt_dir: Path, tmp: Path, final: Path, state: dict, keep: int,
             protect: set[str]) -> CheckpointWriteError | None:
    """Rank 0's part: train_state.json, the rename into place, `latest`, rotation. Returns the failure, if any,
    after undoing what it did (so `latest` keeps naming the newest complete checkpoint)."""
    pointer = ckpt_dir / (LATEST + ".tmp")
    where = tmp / "train_state.json"
    try:
        write_text_synced(where, json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        where = final
        os.replace(tmp, final)
        where = pointer
        write_text_synced(pointer, final.name + "\n")
        where = ckpt_dir / LATEST
        os.replace(pointer, ckpt_dir / LATEST)
    except OSError as e:
        with contextlib.suppress(OSError):
            pointer.unlink(missing_ok=True)
        if where in (pointer, ckpt_dir / LATEST):  # complete, but `latest` does not name it: not a checkpoint
            shutil.rmtree(final, ignore_errors=True)
        return CheckpointWriteError(e.errno, f"writing {where} failed: {e.strerror or e}", str(where))
    # keep the newest `keep` complete checkpoints and the protected ones; stale .tmp directories of killed runs go
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return None


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
