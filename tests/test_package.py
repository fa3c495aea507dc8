"""Packaging checks: import names, version metadata, package data."""

import importlib.metadata
import importlib.resources
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_florenz_kernels_imports():
    import florenz_kernels

    # The installed package is the repo's kernels/ folder under its own import name.
    assert Path(florenz_kernels.__file__).resolve().parent.name in {"kernels", "florenz_kernels"}


def test_no_top_level_kernels_module(tmp_path):
    # Run in a fresh interpreter outside the repo: `python -m pytest` from the repo root puts the
    # working directory on sys.path, which would find kernels/ there whatever the install does.
    code = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps(None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    found = json.loads(out)
    if found is None:
        return
    # Something else called `kernels` (e.g. Hugging Face's package) is fine; ours is not.
    origin, locations = found
    ours = (REPO / "kernels").resolve()
    for p in [origin, *locations]:
        if p and p not in ("namespace", "built-in", "frozen"):
            assert not Path(p).resolve().is_relative_to(ours), f"top-level `kernels` resolves to {p}"


def test_version_matches_distribution_metadata():
    import florenz_fast

    assert florenz_fast.__version__ == importlib.metadata.version("florenz-fast")


def test_checkpoint_keys_are_package_data():
    resource = importlib.resources.files("florenz_fast") / "resources" / "florenz_checkpoint_keys.json"
    assert resource.is_file()
    with resource.open("r", encoding="utf-8") as f:
        json.load(f)
