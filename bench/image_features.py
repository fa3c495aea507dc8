"""The frozen image path once per image: training step time without dedup, with dedup, and with the feature cache.

    python bench/image_features.py                          # CPU, `small`, 2 threads, < 5 min
    python bench/image_features.py --group=2 --batch=16 --mode=padded

The synthetic set through florenz_fast.data.DataPipeline with the grouping sampler (--group annotations per
visit), so a batch of --batch samples holds about batch / group distinct images. The paper's freezing (SPEC §7,
trainable=spec) with --model drop_path 0 (a deterministic frozen tower: dedup and the cache need it; drop_path
costs nothing measurable here). Every configuration trains the same batches from the same weights, forward +
backward + AdamW, eager, the `sdpa+dense` backend; before timing, the first step's loss must be torch.equal
across configurations. Repeats are interleaved; medians reported. Writes image_features.json / .md to --out.
  plain    the batches collated without image ids: every sample's image through the tower (static: every slot)
  dedup    each distinct image once (packing.image_inputs, Florenz.batch_image_tokens)
  cached   the tokens of every image from the on-disk cache (features.py), filled before timing: no tower
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from florenz_fast import ops
from florenz_fast.config import get_config
from florenz_fast.data import DataPipeline, build_synthetic_tokenizers, synthetic_records
from florenz_fast.features import FeatureCache
from florenz_fast.florenz import Florenz, apply_trainable_policy
from florenz_fast.packing import InputLimits, collate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--mode", default="static", choices=("static", "padded", "packed"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="sdpa+dense")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    cfg = get_config(args.preset)
    cfg.vision.drop_path = 0.0
    torch.manual_seed(0)
    base = Florenz(cfg).train()
    apply_trainable_policy(base, "spec")
    n_samples = args.batch * args.batches
    records = synthetic_records(max(16, n_samples), seed=0, image_size=cfg.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        enc, dec = build_synthetic_tokenizers(tmp, records, vocab_size=512)
        pipe = DataPipeline(records, enc, dec, image_size=cfg.image_size, seed=0, group_size=args.group)
        cache = FeatureCache.for_model(base, Path(tmp) / "features", cfg.image_size)
        t0 = time.perf_counter()
        filled = cache.fill(base, pipe)
        fill_s = time.perf_counter() - t0
        it = iter(pipe)
        examples = [next(it) for _ in range(n_samples)]
        cached_examples = [dataclasses.replace(ex, pixels=None, features=cache.get(ex.image_id)) for ex in examples]
    n_img = cfg.num_image_tokens()
    enc_budget = args.batch * (n_img + max(len(e.prompt_ids) for e in examples)) + 1
    dec_budget = args.batch * max(len(e.labels) for e in examples) + 1
    bounds = dict(max_samples=args.batch, max_encoder_tokens=enc_budget, max_decoder_tokens=dec_budget)
    limits = InputLimits.from_config(cfg)

    def batches(exs):
        return [collate(exs[i:i + args.batch], n_img, args.mode, limits=limits, **bounds)
                for i in range(0, len(exs), args.batch)]

    configs = {"plain": batches([dataclasses.replace(e, image_id=None) for e in examples]),
               "dedup": batches(examples), "cached": batches(cached_examples)}
    distinct = [b.num_images for b in configs["dedup"]]
    models = {k: copy.deepcopy(base) for k in configs}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, foreach=True)
            for k, m in models.items()}

    def step(name, b):
        ops.set_backend(args.backend)
        try:
            torch.manual_seed(1)
            loss = models[name](**b.model_inputs(host_layout=True), return_logits=False).loss
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        finally:
            ops.set_backend(None)
        return loss.detach()

    first = {k: step(k, v[0]) for k, v in configs.items()}  # warm-up, and the validation: identical losses
    if not all(torch.equal(first[k], first["plain"]) for k in first):
        raise SystemExit(f"validation failed: first-step losses differ: { {k: float(v) for k, v in first.items()} }")
    for k, v in configs.items():  # the rest of the warm-up pass
        for b in v[1:]:
            step(k, b)
    times: dict[str, list[float]] = {k: [] for k in configs}
    cpu: dict[str, list[float]] = {k: [] for k in configs}  # process CPU s: less hurt by other load on a shared box
    for rep in range(args.repeats):
        for k, v in configs.items():
            t, c = time.perf_counter(), time.process_time()
            for b in v:
                step(k, b)
            times[k].append((time.perf_counter() - t) / len(v))
            cpu[k].append((time.process_time() - c) / len(v))
        print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f} s/step" for k in times),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    report = dict(args=vars(args), preset=args.preset, image_size=cfg.image_size, torch=torch.__version__,
                  frozen_image_chunk=base.frozen_image_chunk, samples_per_batch=args.batch,
                  distinct_images_per_batch=distinct, cache_fill=dict(filled, seconds=fill_s),
                  seconds_per_step=times, median_s_per_step=med, cpu_seconds_per_step=cpu,
                  median_cpu_s_per_step=med_cpu,
                  speedup_vs_plain={k: med["plain"] / v for k, v in med.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "image_features.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# Frozen image path once per image — {args.preset}, {args.mode} batches of {args.batch}, "
             f"group {args.group}, {args.threads} threads, torch {torch.__version__}", "",
             f"Distinct images per batch: {distinct}; frozen_image_chunk {base.frozen_image_chunk}; cache fill: "
             f"{filled['computed']} images in {fill_s:.1f} s.", "",
             "| config | s / step (median) | vs plain | CPU s / step (median) | vs plain |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {med[k]:.3f} | {med['plain'] / med[k]:.2f}x | {med_cpu[k]:.3f} | "
              f"{med_cpu['plain'] / med_cpu[k]:.2f}x |" for k in configs]
    (out / "image_features.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
