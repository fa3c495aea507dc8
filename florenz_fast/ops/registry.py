"""The backend registry and the one backend chain of florenz_fast.ops (conventions: florenz_fast.ops' docstring).

Every op has a table {backend name: implementation}; `torch` (florenz_kernels.reference) is always there. A call
runs the first member of its chain that implements the op; a member that raises `Unsupported` passes the call on
to the next, and every chain ends at `torch`. The chain is the call's `backend=`, else the process-wide default
(`set_backend`), else the FLORENZ_ATTN_BACKEND environment variable, else "torch".
"""

from __future__ import annotations

import os
from typing import Callable

OPS = ("attention", "rms_norm", "add_rms_norm", "geglu", "rope", "linear_cross_entropy", "image_tokens", "dropout",
       "decode_attention", "cross_decode_attention", "rope_kv_append", "cached_attention")
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
_BACKENDS: dict[str, Callable] = _REGISTRY["attention"]  # attention's table (tests register probes here)
_default_backend: str | None = None  # set_backend's; tests that save / restore it use this module's global


class Unsupported(Exception):
    """Raised by a backend for a call it does not cover: the next backend of the chain takes it."""


def register_backend(name: str, fn: Callable, *, op: str = "attention") -> None:
    """Register `fn` as backend `name` of `op` (default: attention)."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    _REGISTRY[op][name] = fn


def available_backends() -> list[str]:
    """Every backend name some op implements (a chain may name any of them)."""
    return sorted({name for fns in _REGISTRY.values() for name in fns})


def chain(name: str) -> list[str]:
    """The members of a chain "a+b+..." (ValueError for an unknown name)."""
    parts = name.split("+")
    if not all(any(p in fns for fns in _REGISTRY.values()) for p in parts):
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()} "
                         f"(chains as 'a+b')")
    return parts


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None: back to FLORENZ_ATTN_BACKEND or `torch`)."""
    global _default_backend
    if name is not None:
        chain(name)
    _default_backend = name


def get_backend() -> str:
    name = _default_backend or os.environ.get("FLORENZ_ATTN_BACKEND") or "torch"
    try:
        chain(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r} (FLORENZ_ATTN_BACKEND?); "
                         f"available: {available_backends()}") from None
    return name


def dispatch(op: str, backend: str | None, /, *args, **kw):
    """Run `op` on the first member of the chain `backend` (None: get_backend()) that implements it and does not
    raise Unsupported; else on its `torch` definition."""
    fns = _REGISTRY[op]
    for name in chain(backend or get_backend()):
        fn = fns.get(name)
        if fn is None:
            continue
        try:
            return fn(*args, **kw)
        except Unsupported:
            continue
    return fns["torch"](*args, **kw)
