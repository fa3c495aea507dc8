"""florenz_kernels stands alone: in a fresh virtual environment that can import torch, triton and their own
dependencies and nothing else, a copy of kernels/ named florenz_kernels imports and runs every op under the Triton
interpreter, each against its pure-torch reference, and never imports florenz_fast or transformers.

How the environment is isolated (`python -m venv --system-site-packages` would expose transformers and the
editable florenz_fast, and pointing a .pth at the main site-packages would expose the same, since a .pth adds whole
directories): `python -m venv --without-pip` gives an empty site-packages; a second directory is filled with
symlinks to exactly the files of torch's installed dependency closure, read from the distributions' metadata
(Requires-Dist with markers and extras evaluated, recursively: triton, sympy, the CUDA wheels, ...) plus numpy,
which Triton's interpreter imports without declaring it; a .pth file adds that directory and the kernels copy. The
interpreter runs with -I (no PYTHONPATH, no user site, no script directory on sys.path), so nothing else can leak
in, and the script asserts that transformers and florenz_fast cannot even be found. Symlinks keep the set-up at
~0.1 s instead of copying ~5 GB of torch and CUDA libraries.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ROOTS = ("numpy",)  # triton/runtime/interpreter.py imports numpy; triton's metadata does not list it


def dependency_closure(roots: tuple[str, ...]) -> dict[str, md.Distribution]:
    """Installed distributions reachable from `roots` through Requires-Dist (markers and requested extras
    evaluated against this interpreter), keyed by canonical name. A requirement that is not installed is an error:
    the closure would silently be incomplete."""
    env = default_environment()
    todo = [(r, frozenset()) for r in roots]
    seen: dict[str, md.Distribution] = {}
    done: set[tuple[str, frozenset]] = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in done:
            continue
        done.add(key)
        dist = md.distribution(name)
        seen[key[0]] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                                  for e in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return seen


def link_distributions(dists: dict[str, md.Distribution], site: Path) -> list[str]:
    """Symlink every top-level file or directory the distributions installed (and their .dist-info) into `site`."""
    site.mkdir(parents=True)
    linked = []
    for dist in dists.values():
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or (site / top).exists() or (site / top).is_symlink():
                continue
            if not (base / top).exists():
                continue
            (site / top).symlink_to(base / top)
            linked.append(top)
    return linked


_SCRIPT = r'''
import importlib.util, json, os, sys
assert os.environ["TRITON_INTERPRET"] == "1"
missing = {m: importlib.util.find_spec(m) is None for m in ("transformers", "florenz_fast")}
import torch
import torch.nn.functional as F
import florenz_kernels
from florenz_kernels import reference as R
from florenz_kernels.geglu import geglu
from florenz_kernels.image_tokens import image_tokens
from florenz_kernels.linear_cross_entropy import linear_cross_entropy
from florenz_kernels.rms_norm import add_rms_norm, rms_norm
from florenz_kernels.rope import rope_, rope_tables
from florenz_kernels.softcap_attention import softcap_attention

g = torch.Generator().manual_seed(0)
def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

def check(name, fast, ref, inputs):
    """fast(*fp32 inputs) vs ref(*float64 inputs): outputs and input gradients within 2x the fp32 reference's error
    (+ 32 fp32 ulps at the tensor's scale, the kernels' tests' slack)."""
    results = []
    for fn, dt in ((fast, torch.float32), (ref, torch.float32), (ref, torch.float64)):
        xs = [x.detach().to(dt, copy=True).requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x
              for x in inputs]
        out = fn(*xs)
        out = out if isinstance(out, (tuple, list)) else (out,)
        out = [o for o in out if o is not None]
        w = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) for o in out]
        sum((o.double() * wi).sum() for o, wi in zip(out, w)).backward()
        grads = [x.grad for x in xs if torch.is_tensor(x) and x.grad is not None]
        results.append([o.detach() for o in out] + grads)
    ours, low, ref64 = results
    assert len(ours) == len(ref64) > 1, name
    worst = 0.0
    for a, lo, r in zip(ours, low, ref64):
        scale = max(1.0, r.abs().max().item())
        err, err_low = (a.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * err_low + 32 * 1.19e-7 * scale, (name, err, err_low)
        worst = max(worst, err)
    return {"tensors": len(ours), "max_err": worst}

report = {}
B, H, Hk, L, D = 2, 4, 2, 9, 16
q, k, v = rnd(B, H, L, D), rnd(B, Hk, L, D), rnd(B, Hk, L, D)
kpm = torch.ones(B, L, dtype=torch.bool); kpm[1, :3] = False
report["softcap_attention padded"] = check(
    "attention", lambda q, k, v: softcap_attention(q, k, v, softcap=5.0, window=4, key_padding_mask=kpm)[0],
    lambda q, k, v: R.softcap_attention_reference(q, k, v, softcap=5.0, window=4, key_padding_mask=kpm)[0], [q, k, v])
cu = torch.tensor([0, 5, 12], dtype=torch.int32)
report["softcap_attention packed"] = check(
    "packed", lambda q, k, v: softcap_attention(q, k, v, softcap=5.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                max_seqlen_q=7, max_seqlen_k=7)[0],
    lambda q, k, v: R.softcap_attention_reference(q, k, v, softcap=5.0, cu_seqlens_q=cu, cu_seqlens_k=cu)[0],
    [rnd(12, H, D), rnd(12, Hk, D), rnd(12, Hk, D)])
x, w = rnd(3, 5, 32), rnd(32, scale=0.3)
report["rms_norm"] = check("rms_norm", lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: R.rms_norm_reference(x, w, 1e-6),
                           [x, w])
report["add_rms_norm"] = check(
    "add_rms_norm", lambda r, y, w, w2: add_rms_norm(r, y, w, 1e-6, next_weight=w2),
    lambda r, y, w, w2: R.add_rms_norm_reference(r, y, w, 1e-6, next_weight=w2), [rnd(3, 5, 32), x, w, rnd(32)])
report["geglu"] = check("geglu", geglu, R.geglu_reference, [rnd(4, 48), rnd(4, 48)])
cos, sin = rope_tables(torch.arange(L), D)
def rope_fast(q, k):
    return rope_(q.clone(), k.clone(), cos, sin)
report["rope"] = check("rope", rope_fast, lambda q, k: R.rope_reference(q, k, cos.to(q.dtype), sin.to(q.dtype)),
                       [rnd(B, H, L, D), rnd(B, Hk, L, D)])
labels = torch.randint(0, 50, (2, 7), generator=g); labels[0, :2] = -100
report["linear_cross_entropy"] = check(
    "lce", lambda h, w: linear_cross_entropy(h, w, labels, softcap=3.0, chunk_size=5),
    lambda h, w: R.linear_cross_entropy_reference(h, w, labels, softcap=3.0), [rnd(2, 7, 16), rnd(50, 16, scale=0.5)])
report["image_tokens"] = check("image_tokens", image_tokens, R.image_tokens_reference,
                               [rnd(2, 4, 24), rnd(4, 24), rnd(32, 24, scale=0.2), rnd(32), rnd(32)])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("florenz_fast", "transformers"))
print(json.dumps({"missing": missing, "leaked": leaked, "ops": report,
                  "kernels_file": florenz_kernels.__file__, "torch_file": torch.__file__}))
'''


def test_florenz_kernels_runs_with_only_torch_and_triton(tmp_path):
    # ~12 s on the 2-core box (importing torch + triton, the interpreter runs): under the 30 s `slow` line
    dists = dependency_closure(("torch", *EXTRA_ROOTS))
    assert {"torch", "triton", "numpy"} <= set(dists)
    assert not {"transformers", "florenz-fast", "safetensors"} & set(dists)  # the closure itself is torch's only
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    deps, pkgs = tmp_path / "deps", tmp_path / "pkgs"
    link_distributions(dists, deps)
    shutil.copytree(ROOT / "kernels", pkgs / "florenz_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "florenz_deps.pth").write_text(f"{deps}\n{pkgs}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["missing"] == {"transformers": True, "florenz_fast": True}  # not installed there at all
    assert out["leaked"] == []
    assert Path(out["kernels_file"]).is_relative_to(pkgs)  # the copy, not the repo's symlink or an install
    assert Path(out["torch_file"]).is_relative_to(deps)
    assert sorted(out["ops"]) == sorted(["softcap_attention padded", "softcap_attention packed", "rms_norm",
                                         "add_rms_norm", "geglu", "rope", "linear_cross_entropy", "image_tokens"])
    assert all(r["tensors"] >= 2 for r in out["ops"].values())
