"""CPU peak memory of the loss, fused vs unfused, each in its own subprocess (peak RSS).

    python bench/loss_memory.py [--tokens 2048 --hidden 2304 --vocab 256000 --threads 2]

One forward + backward of lm_head + softcap 30 + cross-entropy (fp32, 1 in 8 labels ignored) with gradients for
the hidden states and the weight: `unfused` = florenz_fast.ops' torch backend (the model's reference path:
logits, softcap, fp32 cross-entropy), `fused` = florenz_kernels.linear_cross_entropy (chunked, no logits; on a
CPU without TRITON_INTERPRET its per-row part runs as torch ops). Reports the process's peak RSS (VmHWM, reset
once the inputs exist) and that peak minus the RSS with the inputs (the loss's own memory: the V x D weight gradient
both paths must produce, plus whatever else the loss holds). Writes bench/results/cpu/loss_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so that the transients of
    # building the inputs do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(mode: str, T: int, D: int, V: int, threads: int) -> dict:
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g).mul_(0.5).requires_grad_()
    w = torch.randn(V, D, generator=g).mul_(0.02).requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::8] = -100
    if mode == "fused":
        from florenz_kernels.linear_cross_entropy import linear_cross_entropy as fn
    else:
        from florenz_fast import ops

        def fn(h, w, labels, **kw):
            return ops.linear_cross_entropy(h, w, labels, backend="torch", **kw)
    reset_peak_rss()
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    loss = fn(h, w, labels, softcap=30.0)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = status_mib("VmHWM")
    grads_mib = (h.grad.numel() + w.grad.numel()) * 4 / 2**20  # what both paths must produce
    return {"mode": mode, "loss": loss.item(), "grads_mib": grads_mib, "beyond_grads_mib": peak - base - grads_mib,
            "grad_h_norm": h.grad.norm().item(), "grad_w_norm": w.grad.norm().item(),
            "rss_after_inputs_mib": base, "peak_rss_mib": peak,
            "loss_peak_mib": peak - base, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2304)
    ap.add_argument("--vocab", type=int, default=256000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default="")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.hidden, a.vocab, a.threads)))
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results = {}
    for mode in ("fused", "unfused"):  # side by side, one fresh process each
        res = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(a.tokens), "--hidden",
                              str(a.hidden), "--vocab", str(a.vocab), "--threads", str(a.threads)],
                             capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(f"{mode} run failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
        results[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(results[mode], flush=True)
    f, u = results["fused"], results["unfused"]
    summary = {"tokens": a.tokens, "hidden": a.hidden, "vocab": a.vocab, "dtype": "fp32", "threads": a.threads,
               "fused": f, "unfused": u, "loss_abs_diff": abs(f["loss"] - u["loss"]),
               "peak_rss_ratio": f["peak_rss_mib"] / u["peak_rss_mib"],
               "loss_peak_ratio": f["loss_peak_mib"] / u["loss_peak_mib"],
               "beyond_grads_ratio": f["beyond_grads_mib"] / u["beyond_grads_mib"]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "loss_memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = (f"Loss fwd+bwd, {a.tokens} tokens x hidden {a.hidden} x vocab {a.vocab}, fp32, CPU ({a.threads} threads)\n\n"
          "| path | peak RSS (MiB) | peak - RSS with inputs (MiB) | of which beyond dh + dW | seconds | loss |\n"
          "|---|---:|---:|---:|---:|---:|\n"
          + "".join(f"| {m} | {r['peak_rss_mib']:,.0f} | {r['loss_peak_mib']:,.0f} | {r['beyond_grads_mib']:,.0f} | "
                    f"{r['seconds']:.1f} | {r['loss']:.6f} |\n" for m, r in (("fused", f), ("unfused", u)))
          + f"\nfused / unfused: peak RSS {summary['peak_rss_ratio']:.1%}; the loss's own memory (peak - inputs) "
            f"{summary['loss_peak_ratio']:.1%}; beyond the gradients both must produce "
            f"{summary['beyond_grads_ratio']:.1%}\n")
    (out / "loss_memory.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
