"""Generation benchmark: cached beam search (eager, torch.compile'd, CUDA graph) vs the published code's
full-recompute path, side by side.

    python bench/generate.py                       # CPU: `small`, batch 8, 4 beams, 64 new tokens, all paths
    python bench/generate.py --threads 2 --new-tokens 32 --beams 1   # the issue-16 greedy case
    python bench/generate.py --device cuda --preset florenz-3.5b --batch 1,64 --dtype bfloat16 --cuda-graph

    python bench/generate.py --continuous --threads 2 --new-tokens 32 --beams 4   # static vs continuous batching

Modes: "cached" (the eager cached step), "cached+compile" (generate(compile=True): decoder + search in one
torch.compile'd graph; its first call, which compiles, is timed apart as compile_s), "cached+cuda_graph" (CUDA:
that step captured in one CUDA graph), "uncached (published)". Each mode reports tokens/s and its speed-up over
the uncached path measured in the same run, end to end (total) and for the decode part.

Random weights (from-scratch initialisation, seeded); every sequence decodes exactly --new-tokens tokens
(min_new_tokens = max_new_tokens: eos is masked), so both paths do the same work and outputs are compared
token for token and score for score. Times are wall clock of `generate` (vision + encoder + search) and of
the decode part alone (generate minus an encode-only run).

--continuous (issue 16 item 2) measures images/s of static batches against continuous batching
(generate_continuous) on one set with skewed caption lengths, side by side in one run, and their ratio. The skew:
request i of --continuous-images asks for max(2, round(new_tokens * u_i ** 3)) tokens, u_i uniform in [0, 1)
(seeded): most captions short, a few long (eos is masked until then: min_new_tokens = new_tokens, so each request
decodes exactly its own count). Static = chunks of --batch requests in file order, each generate call run to
the longest request of its chunk (what a static batch costs when its captions end at different steps: it runs
until its longest one ends); continuous = the same requests in --batch slots, each slot refilled when its
request ends. Both eager, both include vision + encoder. Greedy tokens are checked (a static row's first
tokens equal the continuous row's: greedy is prefix-consistent); beam rows of a longer static search are other
searches, so only their count is compared (tests/test_continuous.py checks identity against static batches of
the same lengths).

GPU memory-bandwidth accounting, per decode step (bytes actually needed, each read once):
  decoder weights read by the step (every decoder parameter except the cross-attention k/v projections, whose
  output is cached; the tied embedding / lm_head table counted once), + the self-attention KV cache slots
  valid at that step (k and v, every layer, every row), + the cross-attention K/V cache (once per image,
  shared by its beams), + the beam reorder (read + write of the whole self-attention cache, beams > 1).
Achieved fraction = bytes / decode-step time / peak (H100 SXM: 3.35 TB/s, H200: 4.8 TB/s).

CPU compute accounting (every CPU run): a CPU step is bound by its matmuls, not by memory (the `small` decoder's
weights, ~26 MB in float32, are read in ~2 ms at the measured step rates; its matmuls take ~7 ms). So each mode's
matmul FLOPs (torch.utils.flop_counter: mm / addmm / bmm / convolution; elementwise ops, softmax and top-k are
not counted) are counted in one extra untimed eager call (one for the cached modes, whose compiled call does
the eager one's math, one for the uncached), and set against the machine's measured GEMM roof: the best
of a few 1024^3 float matmuls at the same thread count. Per mode: achieved GFLOP/s and its fraction of that
roof; per batch, `speedup_bound`: the uncached time over the cached path's FLOPs at the roof, the most any
cached path doing these FLOPs could gain over the uncached path measured in this run.
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
from florenz_fast.generate import GenerationConfig, Job, generate, generate_continuous

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


def gemm_roof(dtype) -> float:
    """The CPU's best matmul rate (FLOP/s) at the current thread count: the best of 5 timed 1024^3 matmuls."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024 ** 3 / (time.perf_counter() - t))
    return best


def matmul_flops(fn) -> int:
    """Matmul FLOPs of one call of fn (mm, addmm, bmm, convolution; see the module doc)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


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


def build_model(args):
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
    return model, cfg, device, dtype


def run_continuous(args):
    """Static batches vs continuous batching on a set with skewed caption lengths (see the module doc)."""
    from dataclasses import replace

    model, cfg, device, dtype = build_model(args)
    B, n = int(args.batch.split(",")[0]), args.continuous_images
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
    ids = torch.randint(3, cfg.encoder.vocab_size, (n, 12), generator=g).to(device)
    ids[:, 0], ids[:, -1] = 0, 2
    limits = [max(2, round(args.new_tokens * float(u) ** 3)) for u in torch.rand(n, generator=g)]
    gen = GenerationConfig.for_model(cfg, num_beams=args.beams, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens)
    jobs = [Job(input_ids=ids[i], pixels=pixels[i], max_new_tokens=limits[i]) for i in range(n)]

    def static():
        out = []
        for s in range(0, n, B):
            res = generate(model, pixels[s:s + B], ids[s:s + B],
                           config=replace(gen, max_new_tokens=max(limits[s:s + B])))
            out += res.tokens
        return out

    def continuous():
        return generate_continuous(model, jobs, slots=B, config=gen)

    row = {"preset": cfg.name, "slots": B, "images": n, "beams": args.beams, "new_tokens_max": args.new_tokens,
           "limits": limits, "useful_tokens": sum(limits), "dtype": args.dtype, "device": str(device),
           "static_steps": sum(max(limits[s:s + B]) for s in range(0, n, B))}
    print(f"{n} images, {B} slots, {args.beams} beams; caption lengths (skewed): {limits}", flush=True)
    modes = (("static", static), ("continuous", continuous))
    times = {name: [] for name, _ in modes}
    outs = {}
    with torch.no_grad():
        for _, fn in modes:
            fn()  # warm-up (allocator, first-call costs)
        # interleaved (static, continuous, static, ...): on the shared machine the load moves within a run, and
        # both modes should see the same
        for _ in range(max(1, args.repeats)):
            for name, fn in modes:
                outs[name], t = timed(fn, device)
                times[name].append(t)
    for name, _ in modes:
        t = sorted(times[name])[len(times[name]) // 2]
        row[name] = {"total_s": t, "all_total_s": times[name], "images_per_s": n / t,
                     "useful_tokens_per_s": sum(limits) / t}
        print(f"{name:10s} {t:8.3f} s  {n / t:7.2f} images/s  {sum(limits) / t:8.1f} useful tokens/s  (all: "
              + ", ".join(f"{x:.3f}" for x in times[name]) + ")", flush=True)
    out, static_tokens = outs["continuous"], outs["static"]
    row["continuous"].update(steps=out.steps, refills=out.refills)
    tokens = [r.tokens for r in out.results]
    row["speedup"] = row["static"]["total_s"] / row["continuous"]["total_s"]
    pairs = sorted(a / b for a, b in zip(times["static"], times["continuous"]))
    row["speedup_pairs_median"] = pairs[len(pairs) // 2]
    row["lengths_match"] = [len(t) for t in tokens] == limits
    if args.beams == 1:
        row["greedy_tokens_match"] = all(s[:len(c)] == c for s, c in zip(static_tokens, tokens))
    print(f"continuous / static: {row['speedup']:.2f}x images/s (medians; per interleaved pair, median "
          f"{row['speedup_pairs_median']:.2f}x; decode steps: static {row['static_steps']}, "
          f"continuous {row['continuous']['steps']}, {row['continuous']['refills']} refills); lengths match: "
          f"{row['lengths_match']}" + (f"; greedy tokens match: {row['greedy_tokens_match']}" if args.beams == 1
                                        else ""), flush=True)
    return row


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args):
    model, cfg, device, dtype = build_model(args)
    gen = GenerationConfig.for_model(cfg, num_beams=args.beams, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens)
    results = []
    roof = gemm_roof(dtype) if device.type == "cpu" else None
    for batch in [int(b) for b in args.batch.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(batch)
        pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device, dtype)
        ids = torch.randint(3, cfg.encoder.vocab_size, (batch, 12), generator=g).to(device)
        ids[:, 0], ids[:, -1] = 0, 2
        row = {"preset": cfg.name, "batch": batch, "beams": args.beams, "new_tokens": args.new_tokens,
               "dtype": args.dtype, "device": str(device)}
        with torch.no_grad():
            (enc, _), t_enc = timed(lambda: model.encode(pixels, ids), device)  # warm
            # the median of 3: on the shared CPU one encode-only run has varied 0.21-0.74 s, and decode_s is
            # generate's time minus this
            t_enc = sorted(timed(lambda: model.encode(pixels, ids), device)[1] for _ in range(3))[1]
        modes = [("cached", dict(cache=True))]
        if getattr(args, "compile", False):  # bench/throughput.py passes no `compile`: off there
            modes.append(("cached+compile", dict(cache=True, compile=True)))
        if args.cuda_graph and device.type == "cuda":
            modes.append(("cached+cuda_graph", dict(cache=True, cuda_graph=True)))
        if not args.skip_uncached and batch <= args.uncached_max_batch:
            modes.append(("uncached (published)", dict(cache=False)))
        outs, flops = {}, {}  # flops: matmul FLOPs per eager call (the compiled mode's is the eager cached one's)
        for name, kw in modes:
            try:
                t_first = None
                if device.type == "cuda" or kw.get("compile"):  # warm-up (allocator, cuBLAS, capture, compile)
                    _, t_first = timed(lambda: generate(model, pixels, ids, config=gen, **kw), device)
                times = []
                for _ in range(max(1, getattr(args, "repeats", 1))):
                    out, t = timed(lambda: generate(model, pixels, ids, config=gen, **kw), device)
                    times.append(t)
                t = sorted(times)[len(times) // 2]  # the median
            except Exception as exc:  # one failing mode (e.g. graph capture) must not lose the others
                print(f"batch {batch} {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            outs[name] = out
            # decode = generate minus the encode-only median; under load an encode-only run can take longer than a
            # whole generate call, and then the decode time is unmeasured (None), not a near-zero division
            dec = t - t_enc if t > t_enc else None
            rec = {"total_s": t, "encode_s": t_enc, "decode_s": dec, "steps": out.steps,
                   "image_tokens_per_s": batch * out.steps / dec if dec else None,
                   "beam_tokens_per_s": batch * args.beams * out.steps / dec if dec else None, "all_total_s": times}
            if device.type == "cpu":
                eager = {**kw, "compile": False}  # a compiled call does the same math (tokens are compared below)
                key = tuple(sorted(eager.items()))
                if key not in flops:
                    with torch.no_grad():
                        flops[key] = matmul_flops(lambda: generate(model, pixels, ids, config=gen, **eager))
                rec["matmul_flops"] = flops[key]
                rec["achieved_GFLOPs"] = rec["matmul_flops"] / t / 1e9
                rec["compute_fraction"] = rec["matmul_flops"] / t / roof
            if t_first is not None and kw.get("compile"):
                rec["compile_s"] = t_first - t  # the first call's extra time: dynamo + inductor
            if device.type == "cuda" and name.startswith("cached") and dec:
                nbytes = decode_bytes(model, batch, args.beams, 1, out.steps, enc.shape[1])
                rec["bytes_per_step"] = nbytes
                rec["achieved_GBps"] = nbytes / (dec / out.steps) / 1e9
                peak = next((v for k, v in PEAK_BW.items() if k in torch.cuda.get_device_name(device)), None)
                if peak:
                    rec["bandwidth_fraction"] = nbytes / (dec / out.steps) / peak
                rec["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            row[name] = rec
            print(f"batch {batch} {name:22s} total {t:8.3f} s  decode " +
                  (f"{dec:8.3f} s  {rec['beam_tokens_per_s']:10.1f} beam tok/s" if dec else
                   "unmeasured (an encode-only run took longer than this whole call)") +
                  (f"  {rec['achieved_GBps']:7.1f} GB/s ({100 * rec.get('bandwidth_fraction', 0):.1f}% of peak)"
                   if "achieved_GBps" in rec else "") +
                  (f"  {rec['achieved_GFLOPs']:6.1f} matmul GFLOP/s ({100 * rec['compute_fraction']:.0f}% of the "
                   f"GEMM roof)" if "compute_fraction" in rec else ""), flush=True)
        ref = outs.get("cached")
        for name, out in outs.items():
            if ref is None:
                break
            same = out.tokens == ref.tokens
            diff = (out.scores.float() - ref.scores.float()).abs().max().item()
            row[name]["tokens_identical_to_cached"] = same
            row[name]["max_score_diff_to_cached"] = diff
        pub = row.get("uncached (published)")
        if pub is not None and "error" not in pub:
            for name in outs:
                if name != "uncached (published)":
                    rec = row[name]
                    rec["speedup_total"] = pub["total_s"] / rec["total_s"]
                    rec["speedup_decode"] = (pub["decode_s"] / rec["decode_s"] if pub["decode_s"] and rec["decode_s"]
                                             else None)
                    print(f"batch {batch}: {name} is {rec['speedup_total']:.2f}x faster than uncached end to end "
                          f"({fmt(rec['speedup_decode'], '.2f')}x decode); tokens identical to cached: "
                          f"{rec['tokens_identical_to_cached']}", flush=True)
            if ref is not None:  # the keys of earlier runs (bench/throughput.py reads the cached mode's)
                row["speedup_total"] = row["cached"]["speedup_total"]
                row["speedup_decode"] = row["cached"]["speedup_decode"]
                print(f"batch {batch}: uncached tokens identical: {pub['tokens_identical_to_cached']}, max score "
                      f"diff {pub['max_score_diff_to_cached']:.2e}", flush=True)
                if "matmul_flops" in row["cached"]:
                    row["gemm_roof_GFLOPs"] = roof / 1e9
                    row["speedup_bound"] = pub["total_s"] / (row["cached"]["matmul_flops"] / roof)
                    print(f"batch {batch}: the cached path's matmuls are {row['cached']['matmul_flops'] / 1e9:.2f} "
                          f"GFLOP; at this CPU's GEMM roof ({roof / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} "
                          f"threads) they take {row['cached']['matmul_flops'] / roof:.3f} s, so no cached path doing "
                          f"them beats the uncached one by more than {row['speedup_bound']:.2f}x", flush=True)
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
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="the torch.compile'd mode "
                   "(auto: on for the CPU, off on CUDA, where the CUDA graph is the fast path and bench/gpu_suite.sh "
                   "has no minutes for inductor)")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per mode, the median reported (0: 3 on the "
                   "CPU, 1 on CUDA)")
    p.add_argument("--skip-uncached", action="store_true")
    p.add_argument("--uncached-max-batch", type=int, default=8, help="run the slow path only up to this batch")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on the shared 2-core "
                   "machine two threads fighting other jobs made every matmul ~100x slower, measured)")
    p.add_argument("--out", default=None, help="directory for generate.json / generate.md (default "
                   "bench/results/<cpu|h100|...>)")
    p.add_argument("--continuous", action="store_true", help="static batches vs continuous batching on a set with "
                   "skewed caption lengths (the module doc); --batch (its first value) is the slot count")
    p.add_argument("--continuous-images", type=int, default=24, help="requests in the --continuous set")
    args = p.parse_args(argv)
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device == "cpu")
    args.repeats = args.repeats or (3 if args.device == "cpu" else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().split()[1].lower()
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / dev
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "argv": sys.argv[1:],
            "gpu": torch.cuda.get_device_name() if args.device != "cpu" else None}
    if args.continuous:
        row = run_continuous(args)
        name = f"generate_continuous_{args.preset}_{args.device.split(':')[0]}_beams{args.beams}"
        tmp = out / (name + ".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "results": [row]}, indent=2) + "\n")
        tmp.replace(out / (name + ".json"))
        print(f"wrote {out / (name + '.json')}")
        return
    results = run(args)
    name = f"generate_{args.preset}_{args.device.split(':')[0]}"
    tmp = out / (name + ".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    tmp.replace(out / (name + ".json"))
    lines = ["| preset | batch | beams | new | mode | total s | decode s | beam tok/s | x uncached (total / decode) "
             "| GB/s | BW frac | matmul GFLOP/s | GEMM-roof frac | same tokens |",
             "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for row in results:
        for mode in ("cached", "cached+compile", "cached+cuda_graph", "uncached (published)"):
            if mode in row and "error" not in row[mode]:
                r = row[mode]
                sp = (f"{r['speedup_total']:.2f} / {fmt(r['speedup_decode'], '.2f')}" if "speedup_total" in r
                      else "-")
                lines.append(f"| {row['preset']} | {row['batch']} | {row['beams']} | {row['new_tokens']} | {mode} | "
                             f"{r['total_s']:.3f} | {fmt(r['decode_s'], '.3f')} | "
                             f"{fmt(r['beam_tokens_per_s'], '.1f')} | {sp} | "
                             f"{fmt(r.get('achieved_GBps'), '.1f')} | {fmt(r.get('bandwidth_fraction'), '.3f')} | "
                             f"{fmt(r.get('achieved_GFLOPs'), '.1f')} | {fmt(r.get('compute_fraction'), '.2f')} | "
                             f"{r['tokens_identical_to_cached']} |")
    for row in results:
        if "speedup_bound" in row:
            lines.append(f"\nbatch {row['batch']}: GEMM roof {row['gemm_roof_GFLOPs']:.1f} GFLOP/s; the cached "
                         f"path's matmuls at that roof bound any cached speed-up over uncached at "
                         f"{row['speedup_bound']:.2f}x")
    tmp = out / (name + ".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / (name + ".md"))
    print(f"wrote {out / (name + '.json')}")


if __name__ == "__main__":
    main()
