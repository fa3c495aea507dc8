"""Generation benchmark: cached beam search vs the published code's full-recompute path, side by side.

    python bench/generate.py                       # CPU: `small`, batch 8, 4 beams, 64 new tokens, both paths
    python bench/generate.py --device cuda --preset florenz-3.5b --batch 1,64 --dtype bfloat16 --cuda-graph

Random weights (from-scratch initialisation, seeded); every sequence decodes exactly --new-tokens tokens
(min_new_tokens = max_new_tokens: eos is masked), so both paths do the same work and outputs are compared
token for token and score for score. Times are wall clock of `generate` (vision + encoder + search) and of
the decode part alone (generate minus an encode-only run).

GPU memory-bandwidth accounting, per decode step (bytes actually needed, each read once):
  decoder weights read by the step (every decoder parameter except the cross-attention k/v projections, whose
  output is cached; the tied embedding / lm_head table counted once), + the self-attention KV cache slots
  valid at that step (k and v, every layer, every row), + the cross-attention K/V cache (once per image,
  shared by its beams), + the beam reorder (read + write of the whole self-attention cache, beams > 1).
Achieved fraction = bytes / decode-step time / peak (H100 SXM: 3.35 TB/s, H200: 4.8 TB/s).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz
from florenz_fast.generate import GenerationConfig, generate

PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def decode_bytes(model, batch: int, beams: int, prompt_len: int, new_tokens: int, n_enc: int) -> float:
    """Average bytes per decode step (see module doc)."""
    d = model.cfg.decoder
    el = next(model.parameters()).element_size()
    cross_proj = sum(l.encoder_attn.k_proj.weight.numel() + l.encoder_attn.v_proj.weight.numel()
                     + (l.encoder_attn.k_proj.bias.numel() * 2 if l.encoder_attn.k_proj.bias is not None else 0)
                     for l in model.decoder.layers)
    weights = (sum(p.numel() for p in model.decoder.parameters()) - cross_proj) * el
    hk, hd = (d.kv_heads, d.head_dim) if d.kind == "gemma2" else (d.heads, d.hidden // d.heads)
    n = batch * beams
    max_len = prompt_len + new_tokens
    slots = [min(l.window, max_len) if getattr(l, "window", None) else max_len for l in model.decoder.layers]
    total = 0.0
    for step in range(new_tokens):
        pos = prompt_len + step - 1
        kv = sum(min(pos + 1, c) for c in slots) * n * hk * hd * 2 * el
        reorder = 2 * sum(slots) * n * hk * hd * 2 * el if beams > 1 else 0
        total += weights + kv + reorder
    cross = batch * n_enc * d.layers * 2 * hk * hd * el
    return total / new_tokens + cross


def run(args):
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    cfg = get_config(args.preset)
    with torch.device(device):
        model = Florenz(cfg)
    # parameters to `dtype`; buffers (RoPE's fp32 inv_freq, built on the CPU on purpose) only move device
    model = model.to(device).eval()
    for p in model.parameters():
        p.data = p.data.to(dtype)
    gen = GenerationConfig.for_model(cfg, num_beams=args.beams, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens)
    results = []
    for batch in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(batch)
        pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
        ids = torch.randint(3, cfg.encoder.vocab_size, (batch, 12), generator=g).to(device)
        ids[:, 0], ids[:, -1] = 0, 2
        row = {"preset": cfg.name, "batch": batch, "beams": args.beams, "new_tokens": args.new_tokens,
               "dtype": args.dtype, "device": str(device)}
        with torch.no_grad():
            (enc, _), t_enc = timed(lambda: model.encode(pixels, ids), device)
            timed(lambda: model.encode(pixels, ids), device)  # warm
            _, t_enc = timed(lambda: model.encode(pixels, ids), device)
        modes = [("cached", dict(cache=True))]
        if args.cuda_graph and device.type == "cuda":
            modes.append(("cached+cuda_graph", dict(cache=True, cuda_graph=True)))
        if not args.skip_uncached and batch <= args.uncached_max_batch:
            modes.append(("uncached (published)", dict(cache=False)))
        outs = {}
        for name, kw in modes:
            try:
                if device.type == "cuda":  # warm-up run (allocator, cuBLAS, graph capture)
                    generate(model, pixels, ids, config=gen, **kw)
                out, t = timed(lambda: generate(model, pixels, ids, config=gen, **kw), device)
            except Exception as exc:  # one failing mode (e.g. graph capture) must not lose the others
                print(f"batch {batch} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            outs[name] = out
            dec = max(t - t_enc, 1e-9)
            rec = {"total_s": t, "encode_s": t_enc, "decode_s": dec, "steps": out.steps,
                   "image_tokens_per_s": batch * out.steps / dec,
                   "beam_tokens_per_s": batch * args.beams * out.steps / dec}
            if device.type == "cuda" and name.startswith("cached"):
                nbytes = decode_bytes(model, batch, args.beams, 1, out.steps, enc.shape[1])
                rec["bytes_per_step"] = nbytes
                rec["achieved_GBps"] = nbytes / (dec / out.steps) / 1e9
                peak = next((v for k, v in PEAK_BW.items() if k in torch.cuda.get_device_name(device)), None)
                if peak:
                    rec["bandwidth_fraction"] = nbytes / (dec / out.steps) / peak
                rec["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            row[name] = rec
            print(f"batch {batch} {name:22s} total {t:8.3f} s  decode {dec:8.3f} s  "
                  f"{rec['beam_tokens_per_s']:10.1f} beam tok/s" +
                  (f"  {rec['achieved_GBps']:7.1f} GB/s ({100 * rec.get('bandwidth_fraction', 0):.1f}% of peak)"
                   if "achieved_GBps" in rec else ""), flush=True)
        ref = outs.get("cached")
        for name, out in outs.items():
            if ref is None:
                break
            same = out.tokens == ref.tokens
            diff = (out.scores.float() - ref.scores.float()).abs().max().item()
            row[name]["tokens_identical_to_cached"] = same
            row[name]["max_score_diff_to_cached"] = diff
        if "uncached (published)" in outs and ref is not None:
            row["speedup_total"] = row["uncached (published)"]["total_s"] / row["cached"]["total_s"]
            row["speedup_decode"] = row["uncached (published)"]["decode_s"] / row["cached"]["decode_s"]
            print(f"batch {batch}: cached is {row['speedup_total']:.2f}x faster end to end "
                  f"({row['speedup_decode']:.2f}x decode); tokens identical: "
                  f"{row['uncached (published)']['tokens_identical_to_cached']}, max score diff "
                  f"{row['uncached (published)']['max_score_diff_to_cached']:.2e}", flush=True)
        results.append(row)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes (images)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--uncached-max-batch", type=int, default=8, help="run the slow path only up to this batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on the shared 2-core "
                   "machine two threads fighting other jobs made every matmul ~100x slower, measured)")
    p.add_argument("--out", default=None, help="directory for generate.json / generate.md (default "
                   "bench/results/<cpu|h100|...>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run(args)
    dev = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().split()[1].lower()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / dev
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "argv": sys.argv[1:],
            "gpu": torch.cuda.get_device_name() if args.device != "cpu" else None}
    name = f"generate_{args.preset}_{args.device.split(':')[0]}"
    tmp = out / (name + ".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    tmp.replace(out / (name + ".json"))
    lines = ["| preset | batch | beams | mode | total s | decode s | beam tok/s | GB/s | BW frac | same tokens |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in results:
        for mode in ("cached", "cached+cuda_graph", "uncached (published)"):
            if mode in row and "error" not in row[mode]:
                r = row[mode]
                lines.append(f"| {row['preset']} | {row['batch']} | {row['beams']} | {mode} | {r['total_s']:.3f} | "
                             f"{r['decode_s']:.3f} | {r['beam_tokens_per_s']:.1f} | {r.get('achieved_GBps', 0):.1f} | "
                             f"{r.get('bandwidth_fraction', 0):.3f} | {r['tokens_identical_to_cached']} |")
    tmp = out / (name + ".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / (name + ".md"))
    print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
