"""The "use the kernels in your model" examples of docs/kernels.md are run as written, so they cannot rot: every
```python block of that section, each in a fresh namespace, on the CPU under the Triton interpreter (the conftest
switches it on) or on CUDA where there is one. Each example checks itself against the reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
SECTION = "## Use the kernels in your model"
# one per op the section promises: padded, varlen and cross attention, RMSNorm (+ residual), GeGLU, RoPE, the loss,
# and the transformers integration; a deleted or renamed example fails the count
EXPECTED = 8


def examples() -> list[str]:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_the_section_has_one_example_per_op():
    blocks = examples()
    assert len(blocks) == EXPECTED
    assert all(len(b.strip().splitlines()) <= 12 for b in blocks)  # "ten lines each": short enough to copy


# the transformers example builds and trains a model under the interpreter: ~7 s here, over the `slow` line
@pytest.mark.parametrize("index", [pytest.param(i, marks=pytest.mark.slow) if i == EXPECTED - 1 else i
                                   for i in range(EXPECTED)])
def test_example_runs(index):
    code = examples()[index]
    torch.manual_seed(index)
    namespace: dict = {"__name__": f"docs_kernels_example_{index}"}
    exec(compile(code, f"{DOC.name}:example{index}", "exec"), namespace)
