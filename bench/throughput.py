"""End-to-end throughput: training (and generation) of the engine's configurations against a baseline that runs
the way the published Florenz code does, side by side in one process on the same samples.

    python bench/throughput.py                                  # CPU: `small`, training + generation, < 5 min
    python bench/throughput.py --preset=florenz-1.0b --device=cuda --precision=bf16 --samples=256 --batch=32
    python bench/throughput.py --scaling                        # the multi-GPU estimate (no measurement)
    python bench/throughput.py --help                           # every option (ThroughputConfig), its default

Training configurations (--train_configs, comma-separated; "name=collation:attention-backend"):
  published   padded batches (every sample padded to the longest of its batch), the `torch` reference attention
              (eager: materialised scores, softcap, masks) everywhere — how the published code trains
  torch       packed batches (cu_seqlens, block-diagonal cross-attention), reference attention
  dense       packed batches, `sdpa+dense` attention: SDPA (fused) where there is no softcap (vision tower,
              encoder), the reference math on one gathered padded batch for the decoder (no per-segment loop)
  triton      packed batches, the Triton kernels (softcap attention and every fused kernel of the `triton`
              backend); GPU only
  sdpa+triton packed batches, SDPA for the softcap-free encoder/vision attention, Triton for the decoder; GPU only
  flex        packed batches, SDPA for the encoder/vision attention, compiled FlexAttention (softcap score_mod,
              document BlockMask) for the decoder — the fused peer that torch itself offers; GPU only (no
              FlexAttention backward on the CPU)
Every configuration trains the same samples (the synthetic set through florenz_fast.data's pipeline) from the
same initial weights, in the same number of optimizer steps (packed token budgets calibrated as in
bench/packing.py), forward + backward + AdamW on everything that trains (SPEC §7 policy). Repeats are
interleaved across configurations; medians are reported. Before timing, each configuration's first-batch losses
are checked against the published-code baseline's.

Generation (bench/generate.py's run): cached beam search (plus its CUDA-graph decode step on a GPU) vs the
uncached recompute-everything path that mirrors the published code; same random-weight model and images, 4
beams, every sequence decoding --new_tokens tokens; tokens compared.

FLOPs: florenz_fast.metrics.train_flops_per_sample, the analytic "model" count (causal attention counts half the
square, no padding; the "executed" convention equals torch's FlopCounterMode on the tiny and small presets,
tests/test_throughput.py). MFU = model FLOPs per second / the device's dense bf16 peak (GPU only).
Writes throughput.json, throughput.md and throughput.png to --out (default bench/results/<device>/).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from florenz_fast import cli, ops
from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz, apply_trainable_policy, image_features_first
from florenz_fast.metrics import NVML, device_peak_tflops, train_flops_per_sample
from florenz_fast.packing import InputLimits
from florenz_fast.syncs import HostReads
from florenz_fast.train import loop_forward_loss
from florenz_fast.vision import DropPath

TRAIN_CONFIGS = {"published": ("padded", "torch"), "torch": ("packed", "torch"), "dense": ("packed", "sdpa+dense"),
                 "triton": ("packed", "triton"), "sdpa+triton": ("packed", "sdpa+triton"),
                 "flex": ("packed", "sdpa+flex"), "static": ("static", "sdpa+dense"),
                 "static-torch": ("static", "torch"), "static-triton": ("static", "triton"),
                 "static-compiled": ("static", "torch"), "dense-cached": ("packed", "sdpa+dense"),
                 "static-cached": ("static", "sdpa+dense"), "static-compiled-cached": ("static", "torch"),
                 "static-compiled-dense": ("static", "sdpa+dense"),
                 "static-compiled-dense-cached": ("static", "sdpa+dense")}
# torch.compile(fullgraph=True, dynamic=False) of forward + loss (inductor; one graph for every static batch)
COMPILED = {"static-compiled", "static-compiled-cached", "static-compiled-dense", "static-compiled-dense-cached"}
# the frozen image path's tokens from the feature cache (florenz_fast/features.py, --data.feature_cache): computed
# once per image before the timed passes, which are then later epochs over the same images. The cache needs a
# deterministic tower, so these models train with drop_path 0 (the published recipe keeps it on, SPEC §7).
CACHED = {"dense-cached", "static-cached", "static-compiled-cached", "static-compiled-dense-cached"}
GPU_ONLY = {"triton", "sdpa+triton", "flex", "static-triton"}
SCHEMA_VERSION = 1


@dataclass
class ThroughputConfig:
    """bench/throughput.py's options (`--key=value`; `python bench/throughput.py --help` lists them)."""

    preset: str = "small"
    mode: str = "both"  # train | generate | both
    train_configs: str = ""  # comma-separated TRAIN_CONFIGS names (default: published,torch,dense + the GPU ones)
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = ""  # fp32 | bf16 | fp16 ("" = bf16 on a GPU, fp32 on the CPU)
    samples: int = 64
    # data: the synthetic set (florenz_fast.data); ragged: uniformly ragged lengths (prompts 8-32 ids, labels 6-48,
    # random ids, a distinct random image per sample), the batch shape of issue 15's side-by-side measurement
    source: str = "data"
    batch: int = 8
    sweep_batches: str = ""  # also train at these batch sizes (e.g. 4,16,32): throughput and peak memory vs batch
    repeats: int = 3
    gen_batch: int = 8
    beams: int = 4
    new_tokens: int = 64
    threads: int = 0  # torch CPU threads (0: torch's default)
    out: str = ""  # report directory ("" = bench/results/<device>/)
    scaling: bool = False  # only the multi-GPU estimate
    peak_tflops: float = 989.0
    efficiency: float = 0.55  # sustained fraction of peak (estimate)
    nvlink_gbps: float = 450.0
    network_gbps: float = 50.0
    overlap: float = 0.7

    def validate(self) -> "ThroughputConfig":
        if self.mode not in ("train", "generate", "both"):
            raise ValueError(f"mode must be one of ('train', 'generate', 'both'), got {self.mode!r}")
        if self.source not in ("data", "ragged"):
            raise ValueError(f"source must be 'data' or 'ragged', got {self.source!r}")
        return self


def bench_module(name: str):
    """bench/<name>.py loaded by file path (bench/ is no package)."""
    import importlib.util

    key = f"florenz_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def results_dir(device: torch.device) -> Path:
    if device.type != "cuda":
        return ROOT / "bench" / "results" / "cpu"
    name = torch.cuda.get_device_name(device).lower()
    short = next((k for k in ("h200", "h100", "a100", "l40s", "l4") if k in name), "gpu")
    return ROOT / "bench" / "results" / short


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, precision):
    if precision == "fp32":
        import contextlib

        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---- training -----------------------------------------------------------------------------------------------


def ragged_samples(n: int, cfg, seed: int) -> list:
    """Uniformly ragged examples: prompts of 8-32 ids, labels of 6-48, random ids in range, random pixels."""
    from florenz_fast.data import EncodedExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, l_ = int(torch.randint(8, 33, (), generator=g)), int(torch.randint(6, 49, (), generator=g))
        prompt = [0, *torch.randint(3, cfg.encoder.vocab_size, (p - 2,), generator=g).tolist(), 2]
        labels = [2, *torch.randint(3, cfg.decoder.vocab_size, (l_ - 2,), generator=g).tolist(), 1]
        pixels = torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
        out.append(EncodedExample(pixels, prompt, labels, "caption-en", image_id=f"ragged-{i}"))
    return out


def cached_samples(model, samples):
    """`samples` with the image tokens in place of the pixels, computed by the engine's frozen image path (what
    the feature cache stores), each distinct image once; and the seconds that took (the cache fill)."""
    t0 = time.perf_counter()
    ids = list(dict.fromkeys(s.image_id for s in samples))
    first = {}
    for s in samples:
        first.setdefault(s.image_id, s.pixels)
    with torch.no_grad():
        tokens = model.frozen_image_tokens(torch.stack([first[i] for i in ids]))
    by_id = dict(zip(ids, tokens))
    return ([dataclasses.replace(s, pixels=None, features=by_id[s.image_id]) for s in samples],
            time.perf_counter() - t0)


def build_train_batches(cfg, samples, batch_size, configs, cache_model=None):
    packing = bench_module("packing")
    calibrate_budgets, make_batches = packing.calibrate_budgets, packing.make_batches

    n_img = cfg.num_image_tokens()
    mean_enc = sum(n_img + len(s.prompt_ids) for s in samples) / len(samples)
    mean_dec = sum(len(s.labels) for s in samples) / len(samples)
    budgets, scale = calibrate_budgets(samples, n_img, batch_size, mean_enc, mean_dec)
    # static: the set's longest sample bounds every segment (max_seqlen_k / q), as a loader truncating to it would
    segments = dict(max_segment_encoder=max(n_img + len(s.prompt_ids) for s in samples),
                    max_segment_decoder=max(len(s.labels) for s in samples))
    batches = {}
    plain = [dataclasses.replace(s, image_id=None) for s in samples]  # published: every sample its own image
    cached, fill_s = (cached_samples(cache_model, samples) if cache_model is not None and CACHED & set(configs)
                      else (None, None))
    for name in configs:
        mode = TRAIN_CONFIGS[name][0]
        # the engine's configurations check ids at collation (the training loop does); `published` does not
        limits = InputLimits.from_config(cfg) if name != "published" else None
        use = plain if name == "published" else cached if name in CACHED else samples
        batches[name] = make_batches(mode, use, n_img, batch_size, budgets, limits, segments)[0]
    return batches, budgets, scale, segments, fill_s


def train_step(model, opt, batch, backend, device, precision, forward_loss=None, n_tokens=None):
    """One step. forward_loss None: the published code's (logits, then the mean cross-entropy); else the loop's
    (loss_sum, token_losses), the sum divided by `n_tokens` (the batch's target tokens, counted on the host before
    the transfer, as the loop does) and backpropagated, and the per-sample sums taken as the loop logs them."""
    ops.set_backend(backend)
    try:
        with _autocast(device, precision):
            inputs = batch.model_inputs(host_layout=True)  # padded without limits (published): no host layout
            if forward_loss is None:
                loss = model(**inputs).loss
            else:
                total, token_losses = forward_loss(inputs)
                loss = total / n_tokens
                batch.per_sample_sums(token_losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    finally:
        ops.set_backend(None)
    return loss


def first_batch_losses(model, batch, backend, device, precision):
    batch = batch.to(device)
    model.eval()
    ops.set_backend(backend)
    try:
        with torch.no_grad(), _autocast(device, precision):
            inputs = batch.model_inputs()
            inputs.pop("labels")
            sums, counts = batch.per_sample_token_losses(model(**inputs).logits)
    finally:
        ops.set_backend(None)
    model.train()
    return (sums / counts.clamp(min=1)).float().cpu()


def run_training(args, device, cfg, samples, configs, batch_size=None):
    torch.manual_seed(0)
    base_model = Florenz(copy.deepcopy(cfg))
    apply_trainable_policy(base_model)
    batches, budgets, scale, segments, fill_s = build_train_batches(cfg, samples, batch_size or args.batch, configs,
                                                                    cache_model=base_model.eval())
    base_model.train()
    models, opts, steps = {}, {}, {}
    for name in configs:
        m = copy.deepcopy(base_model).to(device).train()
        if name in CACHED:  # deterministic tower (see CACHED)
            m.cfg.vision.drop_path = 0.0
            for mod in m.vision_tower.modules():
                if isinstance(mod, DropPath):
                    mod.p = 0.0
        models[name] = m
        if name in COMPILED:  # the compiled forward + loss; compile time lands in the warm-up pass, untimed
            # the frozen image path runs eagerly first (train.make_forward_loss does the same): fixed shapes in
            fn = torch.compile(loop_forward_loss(m), fullgraph=True, dynamic=False)
            steps[name] = lambda inputs, m=m, fn=fn: fn(image_features_first(m, inputs))
        elif name != "published":  # the engine's configurations run the training loop's step
            steps[name] = loop_forward_loss(m)
        # the engine's configurations take its optimizer (train.py: fused AdamW, CPU and CUDA, no host read);
        # `published` keeps torch's multi-tensor AdamW on the CPU, which is no slower than the single-tensor loop
        # that AdamW defaults to for CPU tensors (what the published code gets)
        fused = device.type == "cuda" or name != "published"
        opts[name] = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5,
                                       foreach=not fused, fused=fused)
    # validation: the first samples' losses equal the baseline's (packed batches hold the first samples too)
    ref = first_batch_losses(models["published"] if "published" in models else models[configs[0]],
                             batches[configs[0]][0], TRAIN_CONFIGS[configs[0]][1], device, args.precision)
    checks = {}
    for name in configs:
        got = first_batch_losses(models[name], batches[name][0], TRAIN_CONFIGS[name][1], device, args.precision)
        n = min(len(got), len(ref))
        checks[name] = float((got[:n] - ref[:n]).abs().max())
    tol = 1e-4 if args.precision == "fp32" else 5e-2
    bad = {k: v for k, v in checks.items() if v > tol}
    if bad:
        raise SystemExit(f"validation failed: first-batch per-sample losses differ from {configs[0]}'s by {bad}")

    flops_per_sample = train_flops_per_sample(
        base_model, cfg, sum(len(s.prompt_ids) for s in samples) / len(samples),
        sum(sum(1 for t in s.labels if t != -100) for s in samples) / len(samples))
    target_tokens = sum(b.num_target_tokens for b in batches[configs[0]])
    n_samples = len(samples)
    times = {name: [] for name in configs}
    cpu_times = {name: [] for name in configs}  # process CPU seconds: less sensitive to other load on a CPU box
    peak_mem = {}
    n_tokens = {name: [b.num_target_tokens for b in batches[name]] for name in configs}  # on the host
    for name in configs:  # warm-up: one whole pass (allocator, compiles, and Triton autotuning of every length
        for b, n in zip(batches[name], n_tokens[name]):  # bucket the timed passes meet; the H100 runs of
            # 2026-11-22 warmed 2 batches only)
            train_step(models[name], opts[name], b.to(device), TRAIN_CONFIGS[name][1], device, args.precision,
                       steps.get(name), n)
    _sync(device)
    for rep in range(args.repeats):
        for name in configs:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            on_device = [b.to(device) for b in batches[name]]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for b, n in zip(on_device, n_tokens[name]):
                train_step(models[name], opts[name], b, TRAIN_CONFIGS[name][1], device, args.precision,
                           steps.get(name), n)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
            if device.type == "cuda":
                peak_mem[name] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in configs),
              flush=True)
    # syncs and ops of one more step per configuration, after the timing (the counting slows a step down)
    reads = {}
    for name in configs:
        b = batches[name][0].to(device)
        with HostReads(dispatch=name not in COMPILED) as r:  # compile refuses a dispatch mode
            train_step(models[name], opts[name], b, TRAIN_CONFIGS[name][1], device, args.precision, steps.get(name),
                       n_tokens[name][0])
        _sync(device)
        reads[name] = r
    peak = device_peak_tflops(device)
    rows = []
    for name in configs:
        med = statistics.median(times[name])
        tflops = flops_per_sample * n_samples / med / 1e12
        rows.append(dict(config=name, collation=TRAIN_CONFIGS[name][0], attention=TRAIN_CONFIGS[name][1],
                         steps=len(batches[name]), samples=n_samples, target_tokens=target_tokens,
                         seconds=times[name], cpu_seconds=cpu_times[name],
                         tokens_per_cpu_s=target_tokens / statistics.median(cpu_times[name]),
                         median_s=med, samples_per_s=n_samples / med,
                         tokens_per_s=target_tokens / med, model_tflops_per_s=tflops,
                         mfu=tflops / peak if peak else None, peak_memory_gib=peak_mem.get(name),
                         first_batch_loss_diff=checks[name], syncs_per_step=reads[name].syncs,
                         sync_kinds=dict(reads[name].by_kind),
                         ops_per_step=reads[name].ops if name not in COMPILED else None))
    base = next((r for r in rows if r["config"] == "published"), None)
    for r in rows:
        r["speedup_vs_published"] = base["median_s"] / r["median_s"] if base else None
    return dict(rows=rows, budgets=list(budgets), budget_scale=scale, flops_per_sample=flops_per_sample,
                batch=batch_size or args.batch, static_segments=segments, cache_fill_s=fill_s)


# ---- generation ------------------------------------------------------------------------------------------------


def run_generation(args, device):
    """bench/generate.py's side-by-side run: cached beam search (and, on the GPU, its CUDA-graph decode step) vs
    the uncached recompute-everything path that mirrors the published code; same images, identical tokens."""
    bench_generate = bench_module("generate")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.precision]
    # bench/generate.py's run() reads its own (argparse) options as attributes
    ns = types.SimpleNamespace(device=str(device), preset=args.preset, batch=str(args.gen_batch), beams=args.beams,
                               new_tokens=args.new_tokens, dtype=dtype, cuda_graph=device.type == "cuda",
                               skip_uncached=False, uncached_max_batch=args.gen_batch)
    rows = bench_generate.run(ns)
    lines = ["| batch | beams | new tokens | mode | total s | decode s | beam tokens/s | vs published | same tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        pub = row.get("uncached (published)", {})
        for mode in ("cached", "cached+cuda_graph", "uncached (published)"):
            r = row.get(mode)
            if not r or "error" in r:
                continue
            sp = f"{pub['total_s'] / r['total_s']:.2f}x" if "total_s" in pub else "-"
            lines.append(f"| {row['batch']} | {row['beams']} | {row['new_tokens']} | {mode} | {r['total_s']:.3f} | "
                         f"{bench_generate.fmt(r['decode_s'], '.3f')} | "
                         f"{bench_generate.fmt(r['beam_tokens_per_s'], '.1f')} | {sp} | "
                         f"{r.get('tokens_identical_to_cached')} |")
    return dict(rows=rows, markdown="\n".join(lines))


# ---- the scaling estimate -------------------------------------------------------------------------------------


def scaling_estimate(args) -> dict:
    """Step time and MFU of the CPT recipe for florenz-3.5b / -11.2b on 1-64 GPUs, DDP vs FSDP2: an ESTIMATE from
    the analytic FLOPs, an assumed sustained matmul efficiency, and a ring-collective communication model."""
    with torch.device("meta"):
        models = {p: Florenz(get_config(p)) for p in ("florenz-3.5b", "florenz-11.2b")}
    peak = args.peak_tflops * 1e12
    out = {"assumptions": dict(
        peak_tflops=args.peak_tflops, sustained_fraction=args.efficiency, nvlink_gbps=args.nvlink_gbps,
        network_gbps=args.network_gbps, gpus_per_node=8, global_batch=1024, prompt_tokens=20, target_tokens=30,
        comm_overlap=args.overlap, note="estimate, not a measurement: compute = analytic model FLOPs / "
        "(peak x sustained fraction); DDP all-reduces the trainable bf16 gradients (2 (n-1)/n x bytes); FSDP2 "
        "all-gathers bf16 parameters twice (forward, backward) and reduce-scatters fp32 gradients; the link is "
        "NVLink within a node and the network across nodes; the overlapped share of communication is hidden"),
        "rows": []}
    for preset, model in models.items():
        cfg = model.cfg
        counts = apply_trainable_policy(model)
        params = counts["trainable"] + counts["frozen"]
        per_sample = train_flops_per_sample(model, cfg, 20, 30)
        for n in (1, 2, 4, 8, 16, 32, 64):
            compute = per_sample * 1024 / n / (peak * args.efficiency)
            link = (args.nvlink_gbps if n <= 8 else args.network_gbps) * 1e9
            ring = 2 * (n - 1) / n if n > 1 else 0.0
            for mode in ("ddp", "fsdp2"):
                if mode == "ddp":
                    comm = ring * counts["trainable"] * 2 / link
                    # bf16 weights, fp32 master+adam, grads
                    mem_gib = (params * 2 + counts["trainable"] * (4 + 4 + 4 + 2)) / 2**30
                else:
                    comm = ((n - 1) / n) * (2 * params * 2 + counts["trainable"] * 4) / link if n > 1 else 0.0
                    mem_gib = (params * 2 + counts["trainable"] * 14) / n / 2**30
                step = compute + (1 - args.overlap) * comm
                out["rows"].append(dict(preset=preset, gpus=n, mode=mode, compute_s=compute, comm_s=comm,
                                        step_s=step, mfu=per_sample * 1024 / n / step / peak,
                                        state_gib_per_gpu=mem_gib, estimate=True))
    return out


# ---- report ------------------------------------------------------------------------------------------------------


def markdown(report) -> str:
    env = report["env"]
    if "scaling" in report:
        lines = ["# Multi-GPU step time and MFU: an ESTIMATE for florenz-3.5b / -11.2b (CPT recipe)", ""]
    else:
        lines = [f"# Throughput, {env['device']} — preset {report['args']['preset']}, {report['args']['precision']}",
                 "", f"torch {env['torch']}, triton {env.get('triton')}, {report['args']['samples']} samples "
                 f"({report['args'].get('source', 'data')}), batch "
                 f"{report['args']['batch']} (padded) / calibrated token budgets (packed), "
                 f"{report['args']['repeats']} repeats (medians).", ""]
    tr = report.get("train")
    if tr:
        lines += ["## Training (forward + backward + AdamW)", "",
                  "| config | batches | attention | steps | s / pass | samples/s | target tokens/s | tokens / CPU-s | "
                  "vs published | model TFLOP/s | MFU | peak GiB | first-batch loss diff | syncs / step | "
                  "aten ops / step |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tr["rows"]:
            mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "-"
            mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
            sp = f"{r['speedup_vs_published']:.2f}x" if r["speedup_vs_published"] else "-"
            lines.append(f"| {r['config']} | {r['collation']} | {r['attention']} | {r['steps']} | "
                         f"{r['median_s']:.3f} | "
                         f"{r['samples_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | {sp} | "
                         f"{r['model_tflops_per_s']:.4f} | "
                         f"{mfu} | {mem} | {r['first_batch_loss_diff']:.2g} | {r.get('syncs_per_step', '-')} | "
                         f"{r.get('ops_per_step') or '-'} |")
        seg = tr.get("static_segments")
        lines += ["", "syncs / step: device->host reads in one forward + loss + backward + AdamW step "
                  "(florenz_fast.syncs; on the CPU they are counted where a GPU step would wait); aten ops / step: "
                  "the ops dispatched eagerly (compiled: '-', and only the Python-level reads are counted, since "
                  "torch.compile refuses to run under a dispatch mode).",
                  "published: logits, then the mean cross-entropy (as the published code); the engine's "
                  "configurations: the training loop's step (no logits, the summed loss backpropagated)."]
        if tr.get("cache_fill_s") is not None:
            lines.append(f"*-cached: the frozen image path's tokens from the feature cache, filled once before the "
                         f"timed passes in {tr['cache_fill_s']:.2f} s (one pass of the tower over the set's images, "
                         "not in the times above); the timed passes are later epochs; drop_path 0 in these models.")
        if seg:
            lines.append(f"static batches: segment bounds {seg['max_segment_encoder']} encoder / "
                         f"{seg['max_segment_decoder']} decoder tokens (the set's longest sample) = max_seqlen_k / q.")
        lines.append("")
    if report.get("train_sweep"):
        sweep = report["train_sweep"]
        lines += ["## Training vs batch size (target tokens/s; vs published; peak GiB on a GPU)", "",
                  "| config | " + " | ".join(f"batch {t['batch']}" for t in sweep) + " |",
                  "|---|" + "---|" * len(sweep)]
        for i, r0 in enumerate(sweep[0]["rows"]):
            cells = []
            for t in sweep:
                r = t["rows"][i]
                sp = f" ({r['speedup_vs_published']:.2f}x)" if r["speedup_vs_published"] else ""
                mem = f", {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
                cells.append(f"{r['tokens_per_s']:.1f}{sp}{mem}")
            lines.append(f"| {r0['config']} | " + " | ".join(cells) + " |")
        lines.append("")
    gen = report.get("generate")
    if gen:
        lines += ["## Generation", ""]
        if "skipped" in gen:
            lines.append(f"skipped: {gen['skipped']}")
        else:
            lines.append(gen.get("markdown") or "```\n" + json.dumps(gen, indent=1)[:3000] + "\n```")
        lines.append("")
    sc = report.get("scaling")
    if sc:
        a = sc["assumptions"]
        lines += ["## Multi-GPU ESTIMATE (not measured)", "", a["note"] + ".", "",
                  f"Assumed: peak {a['peak_tflops']} TFLOP/s x sustained {a['sustained_fraction']}, NVLink "
                  f"{a['nvlink_gbps']} GB/s (<= 8 GPUs), network {a['network_gbps']} GB/s per GPU, "
                  f"{a['comm_overlap']:.0%} of communication hidden, global batch {a['global_batch']} of "
                  f"{a['prompt_tokens']} prompt + {a['target_tokens']} target tokens at 224 px. State = weights + "
                  "master weights + AdamW + gradients per GPU, activations not included.", "",
                  "| preset | GPUs | mode | compute s | comm s | step s (est.) | MFU (est.) | state GiB/GPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sc["rows"]:
            lines.append(f"| {r['preset']} | {r['gpus']} | {r['mode']} | {r['compute_s']:.2f} | {r['comm_s']:.2f} | "
                         f"{r['step_s']:.2f} | {100 * r['mfu']:.0f} % | {r['state_gib_per_gpu']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = report.get("train")
    if not tr:
        return None
    sweep = report.get("train_sweep") or []
    memory = any(r["peak_memory_gib"] is not None for t in sweep for r in t["rows"])
    ncols = 2 + bool(sweep) + memory
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
    names = [r["config"] for r in tr["rows"]]
    axes[0].bar(names, [r["tokens_per_s"] for r in tr["rows"]], color="C0")
    axes[0].set_ylabel("target tokens / s (median)")
    axes[0].set_title(f"training, {report['args']['preset']} on {report['env']['device'][:40]}", fontsize=9)
    for r in tr["rows"]:
        for s in r["seconds"]:
            axes[1].scatter(r["config"], tr["rows"][0]["target_tokens"] / s, color="C1", s=12)
    axes[1].set_ylabel("target tokens / s (each repeat)")
    axes[1].set_title("spread over repeats", fontsize=9)
    if sweep:
        batches = [t["batch"] for t in sweep]
        for i, name in enumerate(names):
            axes[2].plot(batches, [t["rows"][i]["tokens_per_s"] for t in sweep], marker="o", label=name)
            if memory:
                axes[3].plot(batches, [t["rows"][i]["peak_memory_gib"] for t in sweep], marker="o", label=name)
        axes[2].set(xlabel="batch size (samples; packed: the calibrated token budget)", ylabel="target tokens / s")
        axes[2].set_title("throughput vs batch size", fontsize=9)
        axes[2].legend(fontsize=8)
        if memory:
            axes[3].set(xlabel="batch size", ylabel="peak GiB allocated")
            axes[3].set_title("peak memory vs batch size", fontsize=9)
            axes[3].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return str(path)


def validate_report(report: dict) -> None:
    """The JSON report's schema (tests/test_throughput.py)."""
    for key in ("schema_version", "env", "args"):
        if key not in report:
            raise ValueError(f"throughput report: missing {key!r}")
    for key in ("device", "torch", "python"):
        if key not in report["env"]:
            raise ValueError(f"throughput report: env lacks {key!r}")
    for r in [r for t in [report.get("train", {})] + report.get("train_sweep", []) for r in t.get("rows", [])]:
        for key, typ in (("config", str), ("median_s", float), ("tokens_per_s", float), ("samples_per_s", float),
                         ("model_tflops_per_s", float), ("seconds", list), ("steps", int)):
            if not isinstance(r.get(key), typ):
                raise ValueError(f"throughput report: train row {r.get('config')!r}: {key} is "
                                 f"{type(r.get(key)).__name__}, expected {typ.__name__}")
            if typ is float and not math.isfinite(r[key]):
                raise ValueError(f"throughput report: train row {r['config']!r}: {key} = {r[key]}")


def main(argv=None) -> int:
    return cli.main(ThroughputConfig, run, argv, prog="python bench/throughput.py", description=__doc__)


def run(args: ThroughputConfig) -> int:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    out = Path(args.out) if args.out else results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(device=device_name(device), torch=torch.__version__, triton=triton_version,
               python=platform.python_version(), threads=torch.get_num_threads())
    nvml = NVML(device)
    report = dict(schema_version=SCHEMA_VERSION, env=env, args=dataclasses.asdict(args))
    if args.scaling:
        report["scaling"] = scaling_estimate(args)
    else:
        cfg = get_config(args.preset)
        configs = [c for c in (args.train_configs.split(",") if args.train_configs else
                               ["published", "torch", "dense"] + (["triton", "sdpa+triton", "flex"]
                                                                  if device.type == "cuda" else [])) if c]
        for c in configs:
            if c not in TRAIN_CONFIGS:
                raise SystemExit(f"unknown training config {c!r}; known: {', '.join(TRAIN_CONFIGS)}")
            if c in GPU_ONLY and device.type != "cuda":
                raise SystemExit(f"training config {c!r} needs a CUDA device (the Triton interpreter is a test tool; "
                                 f"FlexAttention has no CPU backward)")
        # the synthetic set through the data pipeline (bench/packing.py)
        samples = (bench_module("packing").data_samples(args.samples, cfg, seed=0) if args.source == "data"
                   else ragged_samples(args.samples, cfg, seed=0))
        if args.mode in ("train", "both"):
            print(f"training: {', '.join(configs)} on {env['device']}", flush=True)
            report["train"] = run_training(args, device, cfg, samples, configs)
            sweep = sorted({int(b) for b in args.sweep_batches.split(",") if b.strip()} | {args.batch})
            if len(sweep) > 1:
                report["train_sweep"] = []
                for b in sweep:
                    print(f"training at batch {b}", flush=True)
                    report["train_sweep"].append(report["train"] if b == args.batch else
                                                 run_training(args, device, cfg, samples, configs, batch_size=b))
        if args.mode in ("generate", "both"):
            print(f"generation: batch {args.gen_batch}, {args.beams} beams, {args.new_tokens} new tokens", flush=True)
            report["generate"] = run_generation(args, device)
    readings = nvml.read()  # power and SM clock right after the runs (empty without NVML)
    if readings:
        report["nvml"] = readings
    validate_report(report)
    tmp = out / "throughput.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / "throughput.json")
    md = markdown(report)
    (out / "throughput.md").write_text(md)
    plot(report, out / "throughput.png")
    print(md)
    print(f"wrote {out / 'throughput.json'}, throughput.md, throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
