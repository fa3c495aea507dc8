"""The layering rule (DESIGN.md, docs/contributing.md): kernels (and csrc) -> florenz_fast.ops -> model -> train /
generate / bench. Read from the source's import statements (lazy imports inside functions included), so a
violation fails here before it hides behind an import that happens to be cached."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute-ish module name) of every import in the file; relative imports keep their dots."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{alias.name}" if base.strip(".") else base + alias.name)
                    for alias in node.names]
    return out


def _violations(files, banned) -> list[str]:
    return [f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}:{line} imports {name}"
            for p in files for line, name in _imports(p) if any(name == b or name.startswith(b + ".") for b in banned)]


def test_model_code_reaches_kernels_only_through_ops():
    files = [p for p in (ROOT / "florenz_fast").rglob("*.py") if "ops" not in p.relative_to(ROOT).parts[1:2]]
    assert len(files) > 20  # the scan sees the package
    banned = ("florenz_kernels", "triton", "florenz_fast._C", "._C")
    assert _violations(files, banned) == []


def test_kernels_never_import_the_engine():
    files = list((ROOT / "kernels").rglob("*.py"))
    assert _violations(files, ("florenz_fast", "tests")) == []


@pytest.mark.parametrize("module", ["reference.py", "integrations/__init__.py", "integrations/transformers.py",
                                    "__init__.py"])
def test_torch_only_modules_import_no_triton_at_module_level(module):
    # module level only: the integrations import the kernel (and so triton) when called, which is allowed
    tree = ast.parse((ROOT / "kernels" / module).read_text())
    names = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "triton" or n.startswith("triton.")
                or n.lstrip(".") in ("softcap_attention", "rms_norm", "geglu", "rope", "linear_cross_entropy",
                                     "image_tokens")]


def test_the_scan_catches_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from florenz_kernels.rms_norm import rms_norm\n    from . import _C\n")
    assert len(_violations([bad], ("florenz_kernels", "._C"))) == 3  # the module, its name, and the extension
    assert [name for _, name in _imports(bad)] == ["florenz_kernels.rms_norm", "florenz_kernels.rms_norm.rms_norm",
                                                   ".", "._C"]
