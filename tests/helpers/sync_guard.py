"""The sync guard: a context in which any device->host read raises (DESIGN.md 13), on the CPU as on a GPU.

The counting and the definition of a read live in florenz_fast.syncs (bench/throughput.py counts with it)."""

from __future__ import annotations

from florenz_fast.syncs import DeviceHostRead, HostReads

__all__ = ["DeviceHostRead", "no_device_host_reads"]


def no_device_host_reads() -> HostReads:
    """`with no_device_host_reads(): ...` raises DeviceHostRead at the first read inside. Verified against the
    code before issue 15: the padded step raised at florenz._check_ids's int(ids.min()), the packed step at
    Florenz.encode's cu_seqlens.tolist(); tests/test_static.py::test_the_guard_catches_a_read keeps that proof."""
    return HostReads(refuse=True)
