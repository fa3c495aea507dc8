"""Where the time goes: a torch.profiler trace of a few training steps and of cached decode steps, plus top-ops
tables.

    python bench/profile_steps.py                             # CPU, `small`, packed training + generation
    python bench/profile_steps.py --device cuda --preset florenz-0.4b --precision bf16 --backend triton

(Not bench/profile.py: a script in bench/ puts bench/ first on sys.path, and a profile.py there would shadow the
standard library's `profile`, which torch imports through cProfile — every bench script would break.)

Writes to --out (default bench/results/<device>/profile/): train_trace.json.gz and decode_trace.json.gz (Chrome
/ Perfetto traces: open in https://ui.perfetto.dev or chrome://tracing) and profile.md, the top operators by self time
(device time on a GPU, CPU time otherwise) for each phase, with call counts: launch-bound steps show up as many
small kernels and a large CPU share.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch
from torch.profiler import ProfilerActivity, profile

from florenz_fast import ops
from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz, apply_trainable_policy
from florenz_fast.generate import GenerationConfig, generate


def export_trace(prof, path: Path) -> None:
    """Chrome-trace JSON, gzipped (a few MB become ~1 MB; Perfetto and chrome://tracing open .json.gz)."""
    import gzip
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(path.with_suffix(".tmp"), "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
    path.with_suffix(".tmp").replace(path)


def top_ops(prof, device, n=20) -> list[dict]:
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        rows.append(dict(op=ev.key[:80], calls=ev.count, self_cpu_ms=ev.self_cpu_time_total / 1e3,
                         self_device_ms=dev_us / 1e3))
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    rows.sort(key=lambda r: -r[key])
    return rows[:n]


def table(title, rows, steps) -> list[str]:
    out = [f"## {title}", "", "| op | calls / step | self CPU ms / step | self device ms / step |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['op']}` | {r['calls'] / steps:.1f} | {r['self_cpu_ms'] / steps:.2f} | "
                   f"{r['self_device_ms'] / steps:.2f} |")
    return out + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--backend", default="sdpa+dense", help="attention backend (chain) for training")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    ap.add_argument("--compile", action="store_true", help="also profile generation with compile=True (decoder + "
                    "search in one torch.compile'd graph; the compile itself is in the warm-up call)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    spec = importlib.util.spec_from_file_location("florenz_bench_throughput", HERE / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = throughput
    spec.loader.exec_module(throughput)
    packing = throughput.bench_module("packing")
    data_samples, make_batches, results_dir = packing.data_samples, packing.make_batches, throughput.results_dir

    out = Path(args.out) if args.out else results_dir(device) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_config(args.preset)
    torch.manual_seed(0)
    model = Florenz(copy.deepcopy(cfg)).to(device).train()
    apply_trainable_policy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    samples = data_samples(args.samples, cfg, seed=0)
    n_img = cfg.num_image_tokens()
    budgets = (args.batch * (n_img + 40), args.batch * 48)
    batches = [b.to(device) for b in make_batches("packed", samples, n_img, args.batch, budgets)[0]]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def train_step(batch):
        with autocast:
            loss = model(**batch.model_inputs()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ops.set_backend(args.backend)
    try:
        train_step(batches[0])  # warm-up
        with profile(activities=activities) as prof:
            for i in range(args.steps):
                train_step(batches[(i + 1) % len(batches)])
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        ops.set_backend(None)
    export_trace(prof, out / "train_trace.json.gz")
    train_rows = top_ops(prof, device)

    model.eval()
    gen = GenerationConfig.for_model(cfg, num_beams=4, max_new_tokens=16, min_new_tokens=16)
    pixels = torch.stack([s.pixels for s in samples[:4]]).to(device)
    ids = torch.tensor([s.prompt_ids[:8] for s in samples[:4] if len(s.prompt_ids) >= 8][:1] * 4, device=device)
    with torch.no_grad(), autocast:
        generate(model, pixels, ids, config=gen)  # warm-up
        with profile(activities=activities) as prof:
            generate(model, pixels, ids, config=gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
    export_trace(prof, out / "decode_trace.json.gz")
    decode_rows = top_ops(prof, device)
    compiled_rows = None
    if args.compile:
        with torch.no_grad(), autocast:
            generate(model, pixels, ids, config=gen, compile=True)  # warm-up: dynamo + inductor
            with profile(activities=activities) as prof:
                generate(model, pixels, ids, config=gen, compile=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        export_trace(prof, out / "decode_compiled_trace.json.gz")
        compiled_rows = top_ops(prof, device)

    md = [f"# Profile: {args.preset} on {device} ({args.precision}, training attention `{args.backend}`)", "",
          f"Training: {args.steps} packed steps of up to {args.batch} samples (forward + backward + AdamW). "
          "Generation: 4 images, 4 beams, 16 new tokens (cached). "
          "Traces: train_trace.json.gz, decode_trace.json.gz.", ""]
    md += table("Training: top ops by self time", train_rows, args.steps)
    md += table("Generation (one generate call): top ops by self time", decode_rows, 1)
    if compiled_rows is not None:
        md += table("Generation, compile=True (one generate call): top ops by self time", compiled_rows, 1)
    (out / "profile.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out}/profile.md, train_trace.json.gz, decode_trace.json.gz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
