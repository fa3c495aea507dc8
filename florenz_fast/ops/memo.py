"""A memo for what the layers of one forward share: values built from index tensors (cu_seqlens, key masks), kept
while those tensors are alive and unchanged (the same objects, the same version counters: an in-place change
rebuilds). The attention backends build their masks and gather indices here once per forward instead of once per
layer (`small`: 10 attention calls per step, ~25 index ops each).

Nothing is memoised while torch.compile traces (the graph holds the computation) or while a CUDA graph is being
captured (a memoised tensor would be the graph's memory), nor for inference tensors (they have no version counter).
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
_MEMO: dict[tuple, tuple] = {}  # key -> (weakrefs of the tensors the value was built from, their versions, value)
_MAX_ENTRIES = 16  # a forward needs a handful (encoder, decoder self, cross); cleared when full


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def memo(key: tuple, tensors: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """build(), or the value an earlier call with the same `key` built from these same, unchanged `tensors`."""
    if torch.compiler.is_compiling() or _capturing() or any(t.is_inference() for t in tensors):
        return build()
    versions = [t._version for t in tensors]
    hit = _MEMO.get(key)
    if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[2]
    value = build()
    if len(_MEMO) >= _MAX_ENTRIES:
        _MEMO.clear()
    _MEMO[key] = ([weakref.ref(t) for t in tensors], versions, value)
    return value
