"""Shared pytest set-up: tests marked `gpu` run only where CUDA is available; a one-thread fixture."""

from __future__ import annotations

import pytest
import torch

# First, before any test module is collected: on a machine without CUDA this switches the Triton interpreter on
# (TRITON_INTERPRET=1) before anything imports a florenz_kernels kernel module, so that no test module depends on
# the order of its imports or on which module pytest collects first.
from tests.helpers import triton_interpreter  # noqa: F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny tensors: on the 2-core machines, torch's 2 threads fighting
    another busy process made tests/test_ops.py take 24 s instead of 4.4 s (measured). Restored afterwards."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
