"""The sync guard: a context in which any device->host read raises (DESIGN.md 13), on the CPU as on a GPU."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class DeviceHostRead(AssertionError):
    pass


# The ops that read a tensor back to the host (on a CPU tensor too: `.item()`, int(t), bool(t) and float(t)
# dispatch aten._local_scalar_dense there as well, so the guard fires on this machine exactly where a CUDA step
# would wait). Verified against the code before issue 15: the padded step raised at florenz._check_ids's
# int(ids.min()), the packed step at Florenz.encode's cu_seqlens.tolist(); test_the_guard_catches_a_read keeps
# that proof.
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "is_nonzero", "equal", "allclose")


class _NoSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kwargs = kwargs or {}
        if any(s in name for s in _SYNC_OPS) or (name == "aten.repeat_interleave.Tensor"
                                                  and kwargs.get("output_size") is None):
            raise DeviceHostRead(f"device->host read inside the step: {func}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_device_host_reads():
    """Any device->host read inside raises DeviceHostRead: the ops above, and Tensor.tolist / .item / bool(t) /
    int(t) / float(t) / operator.index(t) at the Python level. The methods are patched as well as the dispatch
    mode watched because tolist reads the storage without dispatching an op, and because a dispatch mode does not
    see inside a torch.library custom op (florenz::*): its implementation runs with the mode switched off, so
    bool(bad.any()) there dispatches nothing the mode sees, but still calls Tensor.__bool__."""
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def fn(self, *a, **k):
            if self.device.type == "meta" or (name != "tolist" and self.numel() != 1):  # errors, not reads
                return saved[name](self, *a, **k)
            raise DeviceHostRead(f"Tensor.{name}() inside the step")
        return fn

    for n in names:
        setattr(torch.Tensor, n, refuse(n))
    try:
        with _NoSync():
            yield
    finally:
        for n in names:
            setattr(torch.Tensor, n, saved[n])
