"""florenz_fast.syncs: what counts as a device->host read, counted once, and the patches undone afterwards."""

import pytest
import torch

from florenz_fast.syncs import DeviceHostRead, HostReads


@torch.library.custom_op("florenz_test::reads_inside", mutates_args=())
def _reads_inside(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if bool(x.sum() > 0) else x  # a read a dispatch mode does not see (custom op implementation)


@_reads_inside.register_fake
def _(x):
    return torch.empty_like(x)


def test_each_kind_of_read_is_counted_once():
    x = torch.arange(6.0)
    with HostReads() as r:
        x[0].item()                                   # 1: Tensor.item (not again as _local_scalar_dense)
        int(x[1])                                     # 2
        bool(x[2] > 1)                                # 3
        x.tolist()                                    # 4
        torch.nonzero(x)                              # 5: data-dependent shape
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]))  # 6: no output_size
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]), output_size=3)  # not a read
        _reads_inside(x)                              # 7: inside a custom op, via Tensor.__bool__
        y = (x * 3).sum()                             # ops, no read
    assert r.syncs == 7, dict(r.by_kind)
    assert r.by_kind == {"Tensor.item": 1, "Tensor.__int__": 1, "Tensor.__bool__": 2, "Tensor.tolist": 1,
                         "aten.nonzero.default": 1, "aten.repeat_interleave.Tensor": 1}
    assert r.ops >= 8
    assert float(y) == 45.0  # outside: nothing patched, nothing counted
    assert r.syncs == 7


def test_refuse_raises_at_the_first_read_and_restores():
    saved = torch.Tensor.__bool__, torch.Tensor.tolist
    with pytest.raises(DeviceHostRead, match=r"Tensor.__bool__"):
        with HostReads(refuse=True):
            _reads_inside(torch.ones(3))
    assert (torch.Tensor.__bool__, torch.Tensor.tolist) == saved
    with HostReads(refuse=True):  # no read: no error; multi-element bool() stays torch's own error
        (torch.ones(3) * 2).sum()
        with pytest.raises(RuntimeError, match="ambiguous"):
            bool(torch.ones(3))


def test_without_dispatch_only_python_calls_count():
    with HostReads(dispatch=False) as r:
        torch.arange(3.0)[1].item()
        torch.nonzero(torch.arange(3))  # an aten-only read: not seen without the mode
    assert r.by_kind == {"Tensor.item": 1} and r.ops == 0
