"""GPU benchmarks of the decoder fusions: time (triton.testing.do_bench medians) and peak memory vs the unfused
PyTorch path, and Liger-Kernel's when it is importable.

    python bench/bench_fusions.py                      # default shapes (Gemma-2-2B), writes bench/results/<gpu>/
    FLORENZ_BENCH_QUICK=1 python bench/bench_fusions.py   # smaller loss (4k tokens), fewer repetitions

Cases (bf16):
  loss      fused linear cross-entropy (softcap 30, 1 in 8 labels ignored), 16k tokens x hidden 2304 x vocab
            256,000, forward + backward (grads for hidden and weight), vs F.linear + softcap + fp32 cross-entropy
            (the model's reference path) and Liger's LigerFusedLinearCrossEntropyLoss(softcap=30).
  rms_norm / add_rms_norm (+ scale + next norm) at 16k x 2304; geglu at 16k x 9216; rope on q (8 x 8 x 2048 x 256)
            and k (4 kv heads): forward and forward + backward, achieved GB/s (bytes the fused kernel must move,
            counted below) and its fraction of the H100 SXM's 3.35 TB/s.
Every case is validated against the reference before it is timed (max abs difference printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUICK = os.environ.get("FLORENZ_BENCH_QUICK", "0") not in ("", "0")
PEAK_BW = 3.35e12  # H100 SXM HBM3, bytes/s


def _bench(fn, reps):
    import triton

    return triton.testing.do_bench(fn, warmup=5 if QUICK else 25, rep=reps)  # ms, median


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_loss(results: list, reps: int):
    import torch.nn.functional as F

    from florenz_kernels.linear_cross_entropy import linear_cross_entropy

    T = 4096 if QUICK else 16384
    D, V = 2304, 256000
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(T, D, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda", generator=g)
    labels[::8] = -100

    def unfused():
        z = F.linear(h, w)
        z = torch.tanh(z / 30.0) * 30.0
        return F.cross_entropy(z.float(), labels, ignore_index=-100)

    def fused():
        return linear_cross_entropy(h, w, labels, softcap=30.0)

    impls = {"fused (ours)": fused, "unfused torch": unfused}
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, softcap=30.0)
        impls["liger"] = lambda: liger(w, h, labels)
    except Exception as e:  # optional peer
        print(f"liger-kernel not importable ({type(e).__name__}: {e}); skipped")
    ref = None
    for name, fn in impls.items():
        def step(fn=fn):
            h.grad = w.grad = None
            fn().backward()
        try:
            step()
            loss = fn().item()
            gh, gw = h.grad.float().clone(), w.grad.float().clone()
            if ref is None:
                ref = (loss, gh, gw)
            check = {"loss_diff": abs(loss - ref[0]), "dh_max_diff": (gh - ref[1]).abs().max().item(),
                     "dw_max_diff": (gw - ref[2]).abs().max().item()}
            del gh, gw
            ms_fwd = _bench(lambda fn=fn: fn(), reps)
            ms = _bench(step, reps)
            mib = _peak_mib(step)
            row = {"case": "loss", "impl": name, "tokens": T, "hidden": D, "vocab": V, "fwd_ms": ms_fwd,
                   "fwd_bwd_ms": ms, "peak_mib": mib, **check}
        except torch.OutOfMemoryError as e:
            row = {"case": "loss", "impl": name, "tokens": T, "error": f"OOM: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        print(row, flush=True)
        results.append(row)
        h.grad = w.grad = None
        torch.cuda.empty_cache()


def _elementwise_case(results, case, fused, unfused, inputs, bytes_fwd, bytes_bwd, reps):
    """Time fwd and fwd+bwd of both paths; GB/s of the fused one from the bytes it must move."""
    def run(fn, backward):
        outs = fn(*inputs)
        outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o is not None]
        if backward:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs

    with torch.no_grad():
        a = run(fused, False)
        b = run(unfused, False)
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
    for name, fn in (("fused (ours)", fused), ("unfused torch", unfused)):
        for x in inputs:
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x.grad = None
        with torch.no_grad():
            ms_fwd = _bench(lambda fn=fn: run(fn, False), reps)
        ms_all = _bench(lambda fn=fn: run(fn, True), reps)
        mib = _peak_mib(lambda fn=fn: run(fn, True))
        row = {"case": case, "impl": name, "fwd_ms": ms_fwd, "fwd_bwd_ms": ms_all, "peak_mib": mib,
               "max_diff_vs_unfused": diff}
        if name.startswith("fused"):
            row.update(fwd_gbs=bytes_fwd / ms_fwd / 1e6, fwd_frac_of_peak=bytes_fwd / ms_fwd / 1e-3 / PEAK_BW,
                       bwd_gbs=bytes_bwd / max(ms_all - ms_fwd, 1e-6) / 1e6,
                       bwd_frac_of_peak=bytes_bwd / max(ms_all - ms_fwd, 1e-6) / 1e-3 / PEAK_BW)
        print(row, flush=True)
        results.append(row)


def bench_elementwise(results: list, reps: int):
    from florenz_fast import ops

    R, D, Fd = 16384, 2304, 9216
    e = 2  # bf16 bytes
    g = torch.Generator(device="cuda").manual_seed(1)

    def rnd(*shape, grad=True, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_(grad)

    x, y = rnd(R, D), rnd(R, D)
    w, w2 = rnd(D, dtype=torch.float32), rnd(D, dtype=torch.float32)
    s = rnd(1)

    def norm(backend):
        return lambda y, w: ops.rms_norm(y, w, 1e-6, backend=backend)

    _elementwise_case(results, "rms_norm 16k x 2304", norm("triton"), norm("torch"), [y, w], 2 * R * D * e,
                      3 * R * D * e, reps)

    def add_norm(backend):
        return lambda x, y, w, s, w2: ops.add_rms_norm(x, y, w, 1e-6, scale=s, next_weight=w2, backend=backend)

    # fwd reads x, y, writes h, next; bwd reads dh, d next, y, h, writes dx, dy
    _elementwise_case(results, "add_rms_norm+scale+next 16k x 2304", add_norm("triton"), add_norm("torch"),
                      [x, y, w, s, w2], 4 * R * D * e, 6 * R * D * e, reps)
    gate, up = rnd(R, Fd), rnd(R, Fd)
    _elementwise_case(results, "geglu 16k x 9216", lambda a, b: ops.geglu(a, b, backend="triton"),
                      lambda a, b: ops.geglu(a, b, backend="torch"), [gate, up], 3 * R * Fd * e, 5 * R * Fd * e, reps)
    B, H, Hk, L, Dh = 8, 8, 4, 2048, 256
    qp, kp = rnd(B, L, H * Dh), rnd(B, L, Hk * Dh)
    from florenz_fast.gemma_decoder import Rotary

    cos, sin = Rotary(Dh, 10000.0).cuda().cos_sin(torch.arange(L, device="cuda")[None], torch.bfloat16)

    def rope(backend):
        def fn(qp, kp):  # the model's layout: projection outputs viewed as (B, H, L, D); `* 1` = a fresh output
            q = (qp * 1).view(B, L, H, Dh).transpose(1, 2)
            k = (kp * 1).view(B, L, Hk, Dh).transpose(1, 2)
            return ops.rope(q, k, cos, sin, backend=backend)
        return fn

    nbytes = (B * L * (H + Hk) * Dh) * e
    # (both paths include the `* 1` copy that stands for the projection; GB/s counts only the rotation's bytes)
    _elementwise_case(results, "rope q 8x8x2048x256 + k (4 heads)", rope("triton"), rope("torch"), [qp, kp],
                      2 * nbytes, 2 * nbytes, reps)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python bench/bench_fusions.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)  # --help
    if not torch.cuda.is_available():
        raise SystemExit("bench_fusions.py needs a CUDA GPU (for the CPU memory benchmark: bench/loss_memory.py)")
    os.environ.setdefault("FLORENZ_NO_AUTOTUNE", "1")
    reps = 50 if QUICK else 200
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, quick={QUICK}", flush=True)
    results: list = []
    t0 = time.time()
    bench_loss(results, reps)
    bench_elementwise(results, reps)
    tag = "h100" if "H100" in dev else ("h200" if "H200" in dev else dev.replace(" ", "_").lower())
    out = ROOT / "bench" / "results" / tag
    out.mkdir(parents=True, exist_ok=True)
    name = "fusions_bench_quick" if QUICK else "fusions_bench"
    (out / f"{name}.json").write_text(json.dumps({"device": dev, "torch": torch.__version__, "quick": QUICK,
                                                  "results": results}, indent=2) + "\n")
    lines = ["| case | impl | fwd ms | fwd+bwd ms | peak MiB | fwd GB/s (frac) | bwd GB/s (frac) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['error'][:60]} | | | | |")
            continue
        bw = (f"{r['fwd_gbs']:,.0f} ({r['fwd_frac_of_peak']:.0%}) | {r['bwd_gbs']:,.0f} ({r['bwd_frac_of_peak']:.0%})"
              if "fwd_gbs" in r else " | ")
        lines.append(f"| {r['case']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {r['peak_mib']:,.0f} "
                     f"| {bw} |")
    (out / f"{name}.md").write_text(f"{dev}, torch {torch.__version__}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"done in {time.time() - t0:.0f} s -> {out}/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
