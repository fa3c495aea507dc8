"""Device->host reads, counted or refused: the measurement behind DESIGN.md 13 (the host never waits in a step).

    with HostReads() as r:                 # count: bench/throughput.py's syncs / ops per step
        step()
    r.syncs, r.ops, r.by_kind              # reads, aten ops dispatched, {kind: count}
    with HostReads(refuse=True):           # raise DeviceHostRead at the first read (tests/helpers/sync_guard.py)
        step()

What counts as a read: the aten ops that copy a value back to the host (`_local_scalar_dense`, which .item(),
int(t), bool(t) and float(t) dispatch; `nonzero`, `masked_select`, `unique`, `is_nonzero`, `equal`, `allclose`,
and `repeat_interleave` without output_size: data-dependent shapes), seen by a TorchDispatchMode, and the
Python-level Tensor.tolist / item / __bool__ / __int__ / __float__ / __index__, patched for the duration. Both
are needed: tolist reads the storage without dispatching an op, and a dispatch mode does not see inside a
torch.library custom op (florenz::*), whose implementation runs with the mode switched off, while a
bool(bad.any()) there still calls Tensor.__bool__. On a CPU tensor these are reads too, so the count on this
machine is the count a CUDA step would wait on. A read is counted once (the Python call, or the op it dispatches
when no Python call was seen).
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "allclose")
_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


class DeviceHostRead(AssertionError):
    """A device->host read where none may happen (HostReads(refuse=True))."""


class _Mode(TorchDispatchMode):
    def __init__(self, owner: "HostReads"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.owner.ops += 1
        if any(s in name for s in SYNC_OPS) or (name == "aten.repeat_interleave.Tensor"
                                                and kwargs.get("output_size") is None):
            if not self.owner._inside_method:  # else already counted as the Python call that dispatched it
                self.owner._read(f"device->host read inside the step: {func}", name)
        return func(*args, **kwargs)


class HostReads:
    """Context manager: count (default) or refuse (refuse=True) device->host reads; see the module doc.
    dispatch=False: the Python-level calls only, no dispatch mode (torch.compile refuses to run under one), so
    `ops` stays 0 and reads dispatched by aten ops alone (nonzero, ...) are not seen."""

    def __init__(self, refuse: bool = False, dispatch: bool = True):
        self.refuse, self.dispatch = refuse, dispatch
        self.by_kind: collections.Counter[str] = collections.Counter()
        self.ops = 0
        self._inside_method = False
        self._saved: dict[str, object] = {}
        self._mode: _Mode | None = None

    @property
    def syncs(self) -> int:
        return sum(self.by_kind.values())

    def _read(self, message: str, kind: str) -> None:
        if self.refuse:
            raise DeviceHostRead(message)
        self.by_kind[kind] += 1

    def _patched(self, name: str):
        saved = self._saved[name]

        def fn(tensor, *a, **k):
            # meta tensors and multi-element bool() are errors, not reads: let torch raise them
            if tensor.device.type == "meta" or (name != "tolist" and tensor.numel() != 1) or self._inside_method:
                return saved(tensor, *a, **k)
            self._read(f"Tensor.{name}() inside the step", f"Tensor.{name}")
            self._inside_method = True
            try:
                return saved(tensor, *a, **k)
            finally:
                self._inside_method = False
        return fn

    def __enter__(self) -> "HostReads":
        self._saved = {n: getattr(torch.Tensor, n) for n in _METHODS}
        for n in _METHODS:
            setattr(torch.Tensor, n, self._patched(n))
        self._mode = _Mode(self) if self.dispatch else None
        try:
            if self._mode is not None:
                self._mode.__enter__()
        except BaseException:
            self._restore()
            raise
        return self

    def _restore(self) -> None:
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, fn)
        self._saved = {}

    def __exit__(self, *exc) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(*exc)
        finally:
            self._restore()
