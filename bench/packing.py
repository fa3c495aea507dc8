"""Training throughput with sequence packing vs padding, side by side on the same samples (CPU).

    .venv/bin/python bench/packing.py                               # the default cases, ~3 minutes
    .venv/bin/python bench/packing.py --cases=tiny:data --samples=256

One training step = forward + backward + AdamW step (SPEC §7 trainable policy, model.train()). Within a case
every mode sees the same examples: padded batches of `batch_size` samples, and packed batches (greedy Packer)
under token budgets of s x `batch_size` x the mean per-sample size on each side, with the smallest s at which
packing takes no more steps than padding: the same samples in the same number of optimizer steps, so the
comparison isolates padding waste, not batch size. Modes:
  padded        padded collation, the reference `torch` attention backend
  packed        packed collation, the reference `torch` attention backend (what the engine runs today on CPU)
  packed-unpad  the same packed batches with florenz_fast.ops' `dense` backend (packed attention gathered into one
                padded batch instead of a per-segment loop; it began here as an experiment), validated
                against the reference first: what packing yields once attention is not a per-segment loop
The steps of the modes are interleaved (each advancing through the samples at the same pace) so drift in
machine speed hits all alike. Throughput = target tokens (labels != -100) per CPU-second of step time (and
per wall second); batches are collated before timing (collation time is reported separately). Before timing,
the first packed batch is checked against the padded collation of its samples (per-sample losses, eval mode).

Lengths, per case (`preset:source`):
  data   the synthetic set of florenz_fast.data (its DataPipeline: task-language balancing, SPEC §6 prompts,
         tokenizers of 512 ids trained on the set) - the issue's "synthetic set's real length distribution"
  model  a length model resembling the SPEC §8 mix, longer-tailed than the synthetic set, drawn with a fixed
         seed (random ids and pixels; content does not change the cost):
    keys uniform over caption-en, caption-de, translation-{de,fr,es,ru,zh} (the balanced CPT target)
    caption prompt      16 ids ("The target language is German. What does the image describe?" + <s> </s>)
    caption labels      60 % short captions (COCO-like): lognormal, median 13 tokens, sigma 0.3
                        40 % detailed / paragraph captions (DOCCI, Image Paragraphs): median 70, sigma 0.4
    translation source  lognormal, median 15 tokens, sigma 0.45 (Multi30K-like sentences)
    translation prompt  14 + source ids ("The target language is German. Translate the following text: ...")
    translation labels  source x {de 1.15, fr 1.2, es 1.15, ru 1.25, zh 0.9}
    every label list gets bos + eos; prompts and labels are cut to 128 ids (SPEC §6); at least 3 label ids.
Both modes run the vision tower on the same N images per step.

Writes bench/results/cpu/packing.json and packing.md and prints a summary.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from florenz_fast import cli, ops
from florenz_fast.config import apply_overrides, get_config
from florenz_fast.florenz import Florenz, apply_trainable_policy
from florenz_fast.packing import Batch, ListPipeline, Loader, Packer, collate_padded


@dataclass
class BenchConfig:
    cases: str = "small:data,small:model,tiny:data"  # preset:source, source = data | model (module doc)
    samples: int = 128  # per case; the same samples in every mode
    batch_size: int = 16  # padded samples per step; packed budgets = batch_size x mean size
    repeats: int = 2  # passes over the samples per mode, steps of the modes interleaved
    warmup_steps: int = 2
    threads: int = 1  # see THREADS below
    lr: float = 1e-4
    seed: int = 0
    out: str = "bench/results/cpu"


# The development machine has 2 vCPUs shared with other jobs. With 2 OpenMP threads and one competing
# process, barrier spinning inflated the CPU time of the very same packed step ~10x (measured 3.8 s -> 41 s),
# and more so for packed steps (many small per-segment ops, many barriers). One thread gives repeatable
# numbers; the throughput is reported per CPU-second of step time (robust to other jobs) and per wall second.
THREADS_NOTE = ("1 intra-op thread: the 2-vCPU development machine is shared, and 2 OpenMP threads under "
                "contention made step times swing ~10x")


@dataclass(eq=False)
class Sample:  # the fields of florenz_fast.data.EncodedExample
    pixels: torch.Tensor
    prompt_ids: list[int]
    labels: list[int]
    key: str


KEYS = ("caption-en", "caption-de", "translation-de", "translation-fr", "translation-es", "translation-ru",
        "translation-zh")
RATIO = {"de": 1.15, "fr": 1.2, "es": 1.15, "ru": 1.25, "zh": 0.9}


def model_lengths(n: int, seed: int) -> list[tuple[str, int, int]]:
    """(key, prompt ids, label ids) drawn from the length model in the module doc."""
    g = torch.Generator().manual_seed(seed)

    def lognormal(median, sigma):
        return math.exp(math.log(median) + sigma * torch.randn((), generator=g).item())

    out = []
    for _ in range(n):
        key = KEYS[int(torch.randint(len(KEYS), (), generator=g))]
        if key.startswith("caption"):
            prompt = 16
            short = torch.rand((), generator=g).item() < 0.6
            body = lognormal(13, 0.3) if short else lognormal(70, 0.4)
        else:
            src = max(1, round(lognormal(15, 0.45)))
            prompt = 14 + src
            body = src * RATIO[key.split("-")[1]]
        out.append((key, min(prompt, 128), max(3, min(round(body) + 2, 128))))
    return out


def data_samples(n: int, cfg, seed: int) -> list:
    """`n` examples of the synthetic set through florenz_fast.data.DataPipeline (tokenizers trained offline)."""
    from florenz_fast.data import DataPipeline, build_synthetic_tokenizers, synthetic_records

    records = synthetic_records(max(64, n), seed=seed, image_size=cfg.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        enc_tok, dec_tok = build_synthetic_tokenizers(tmp, records, vocab_size=512)
    it = iter(DataPipeline(records, enc_tok, dec_tok, image_size=cfg.image_size, seed=seed))
    return [next(it) for _ in range(n)]


def model_samples(n: int, cfg, seed: int) -> list:
    g = torch.Generator().manual_seed(seed + 1)
    samples = []
    for key, p, l_ in model_lengths(n, seed):
        prompt = [0, *torch.randint(3, cfg.encoder.vocab_size, (p - 2,), generator=g).tolist(), 2]
        labels = [2, *torch.randint(3, cfg.decoder.vocab_size, (l_ - 2,), generator=g).tolist(), 1]
        pixels = torch.randn(3, cfg.image_size, cfg.image_size, generator=g)
        samples.append(Sample(pixels, prompt, labels, key))
    return samples


SOURCES = {
    "data": ("synthetic set (florenz_fast.data.DataPipeline, tokenizers of 512 ids trained on it)", data_samples),
    "model": ("length model of bench/packing.py (SPEC §8-like mix with paragraph captions)", model_samples),
}


def calibrate_budgets(samples, n_img: int, batch_size: int, mean_enc: float, mean_dec: float):
    """Packed budgets: the smallest multiple s (in steps of 0.02) of batch_size x the mean sample size on each
    side at which the greedy packer needs no more batches than padding does for the same samples, so both
    modes take the same number of optimizer steps (at s = 1 the greedy fill of ~80 % would give packing
    ~25 % more steps, each with its fixed costs)."""
    n_padded = math.ceil(len(samples) / batch_size)
    big_enc = max(n_img + len(s.prompt_ids) for s in samples)
    big_dec = max(len(s.labels) for s in samples)
    for i in range(101):
        scale = 1.0 + 0.02 * i
        budgets = (max(big_enc, math.ceil(scale * batch_size * mean_enc)),
                   max(big_dec, math.ceil(scale * batch_size * mean_dec)))
        if len(list(Packer(n_img, *budgets).pack(samples))) <= n_padded:
            return budgets, scale
    raise SystemExit("could not find packed budgets matching the padded step count")


def make_batches(mode: str, samples, n_img: int, batch_size: int, budgets: tuple[int, int], limits=None,
                 segments: dict | None = None):
    # static: batch_size image slots; `limits` (packing.InputLimits): ids and positions checked at collation, so
    # the model reads nothing back (what the training loop does); `segments`: static segment bounds
    # (max_segment_encoder / max_segment_decoder)
    loader = Loader(ListPipeline(samples), mode=mode, n_image_tokens=n_img, batch_size=batch_size,
                    max_encoder_tokens=budgets[0], max_decoder_tokens=budgets[1],
                    max_samples=batch_size if mode == "static" else None, limits=limits,
                    **(segments if mode == "static" and segments else {}))
    t0 = time.perf_counter()
    batches = list(loader)
    return batches, time.perf_counter() - t0, loader.efficiency()


# mode -> (collation, attention backend); "packed-unpad": ops' `dense` backend on the same packed batches
MODES = {"padded": ("padded", "torch"), "packed": ("packed", "torch"), "packed-unpad": ("packed", "dense")}


def validate(model: Florenz, samples, n_img: int, budgets) -> float:
    """Before timing: the first packed batch gives the padded per-sample losses (eval, no dropout), with the
    reference attention and with the experiment."""
    packed = next(iter(Loader(ListPipeline(samples), mode="packed", n_image_tokens=n_img,
                              max_encoder_tokens=budgets[0], max_decoder_tokens=budgets[1])))
    padded = collate_padded(samples[:packed.num_samples], n_img)
    model.eval()
    with torch.no_grad():
        ref = padded.per_sample_token_losses(model(**padded.model_inputs()).logits)
        diff = 0.0
        for backend in ("torch", "dense"):
            ops.set_backend(backend)
            got = packed.per_sample_token_losses(model(**packed.model_inputs()).logits)
            diff = max(diff, ((got[0] / got[1]) - (ref[0] / ref[1])).abs().max().item())
        ops.set_backend(None)
    model.train()
    if diff > 1e-4:
        raise SystemExit(f"validation failed: packed and padded per-sample losses differ by {diff:.3g}")
    return diff


def train_step(model, opt, batch, backend: str) -> tuple[float, float]:
    """(wall s, CPU s) of forward + backward + optimizer step."""
    ops.set_backend(backend)
    w0, c0 = time.perf_counter(), time.process_time()
    loss = model(**batch.model_inputs()).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    w, c = time.perf_counter() - w0, time.process_time() - c0
    ops.set_backend(None)
    return w, c


class VisionClock:
    """CPU time spent in the image-token pipeline (vision tower + projector) during the timed steps, from
    forward hooks: the frozen tower runs on the same N images in every mode, so this part cannot shrink
    with packing."""

    def __init__(self, model: Florenz):
        self.total, self._t0 = 0.0, None
        model.vision_tower.register_forward_pre_hook(self._start)
        model.projector.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t0 = time.process_time()

    def _stop(self, *_):
        self.total += time.process_time() - self._t0


def interleave(lists: dict[str, list]) -> list[tuple[str, Batch]]:
    """The modes' batch lists merged so that every mode advances through the samples at the same pace."""
    total = {m: sum(b.num_samples for b in bs) for m, bs in lists.items()}
    pos = {m: 0 for m in lists}
    done = {m: 0 for m in lists}
    out = []
    while any(pos[m] < len(bs) for m, bs in lists.items()):
        m = min((m for m in lists if pos[m] < len(lists[m])), key=lambda m: done[m] / total[m])
        b = lists[m][pos[m]]
        out.append((m, b))
        pos[m] += 1
        done[m] += b.num_samples
    return out


def run_case(run: BenchConfig, preset: str, source: str) -> dict:
    cfg = get_config(preset)
    n_img = cfg.num_image_tokens()
    source_text, make = SOURCES[source]
    samples = make(run.samples, cfg, run.seed)
    mean_enc = sum(n_img + len(s.prompt_ids) for s in samples) / len(samples)
    mean_dec = sum(len(s.labels) for s in samples) / len(samples)
    budgets, scale = calibrate_budgets(samples, n_img, run.batch_size, mean_enc, mean_dec)

    torch.manual_seed(run.seed)
    base = Florenz(cfg).train()
    counts = apply_trainable_policy(base)
    diff = validate(base, samples, n_img, budgets)
    models = {m: copy.deepcopy(base) for m in MODES}
    opts = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=run.lr,
                                 weight_decay=0.01) for m in MODES}
    collated = {c: make_batches(c, samples, n_img, run.batch_size, budgets) for c in ("padded", "packed")}
    prep = {m: collated[MODES[m][0]] for m in MODES}
    for m in MODES:
        for b in prep[m][0][:run.warmup_steps]:  # warm-up, not timed
            train_step(models[m], opts[m], b, MODES[m][1])
    print(f"{preset} on the {source_text}: {len(samples)} samples, padded batch {run.batch_size}, packed budgets "
          f"{budgets[0]} encoder / {budgets[1]} decoder tokens", flush=True)
    wall = {m: 0.0 for m in MODES}
    cpu = {m: 0.0 for m in MODES}
    vision = {m: VisionClock(models[m]) for m in MODES}
    for r in range(run.repeats):
        for m, b in interleave({m: prep[m][0] for m in MODES}):
            w, c = train_step(models[m], opts[m], b, MODES[m][1])
            wall[m] += w
            cpu[m] += c
        print(f"  after pass {r + 1}: " + ", ".join(
            f"{m} {sum(b.num_target_tokens for b in prep[m][0]) * (r + 1) / cpu[m]:.0f}" for m in MODES)
            + " target tokens/CPU-s", flush=True)
    res = {}
    for m in MODES:
        batches, collate_s, eff = prep[m]
        tokens = sum(b.num_target_tokens for b in batches) * run.repeats
        steps = len(batches) * run.repeats
        res[m] = {
            "collation": MODES[m][0], "attention_backend": MODES[m][1],
            "steps_per_pass": len(batches),
            "samples_per_step": len(samples) / len(batches),
            "target_tokens_per_pass": tokens // run.repeats,
            "step_cpu_s_mean": cpu[m] / steps, "step_wall_s_mean": wall[m] / steps,
            "target_tokens_per_cpu_s": tokens / cpu[m], "target_tokens_per_wall_s": tokens / wall[m],
            "samples_per_cpu_s": len(samples) * run.repeats / cpu[m],
            "collate_ms_per_batch": 1000 * collate_s / len(batches),
            "efficiency": eff,
        }
    pad = res["padded"]
    return {
        "preset": preset, "source": source, "source_text": source_text, "n_image_tokens": n_img,
        "parameters": counts,
        "budgets": {"max_encoder_tokens": budgets[0], "max_decoder_tokens": budgets[1], "scale": scale},
        "lengths": {"mean_encoder_tokens": mean_enc, "mean_decoder_tokens": mean_dec,
                    "mean_prompt_ids": mean_enc - n_img,
                    "max_prompt_ids": max(len(s.prompt_ids) for s in samples),
                    "max_label_ids": max(len(s.labels) for s in samples)},
        "validation_max_loss_diff": diff, "results": res,
        "vision_cpu_s": {m: vision[m].total for m in MODES},
        "vision_share_of_padded_step": vision["padded"].total / cpu["padded"],
        "speedup_cpu_without_vision": {m: (cpu["padded"] - vision["padded"].total) / (cpu[m] - vision[m].total)
                                       for m in MODES},
        "speedup_cpu": {m: res[m]["target_tokens_per_cpu_s"] / pad["target_tokens_per_cpu_s"] for m in MODES},
        "speedup_wall": {m: res[m]["target_tokens_per_wall_s"] / pad["target_tokens_per_wall_s"] for m in MODES},
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        return cli.print_help(cli.help_text(BenchConfig, prog="python bench/packing.py", description=__doc__))
    try:
        run = apply_overrides(BenchConfig(), argv)
    except (ValueError, KeyError) as exc:  # one `error:` line and exit 2, as every command (florenz_fast.cli)
        return cli.report(exc, cli.USAGE)
    torch.set_flush_denormal(True)  # subnormal floats slow CPU training ~10x (florenz_fast/train.py)
    torch.set_num_threads(run.threads)
    cases = [c.split(":") for c in run.cases.split(",") if c.strip()]
    for c in cases:
        if len(c) != 2 or c[1] not in SOURCES:
            raise SystemExit(f"bad case {':'.join(c)!r}: expected preset:source with source in {list(SOURCES)}")
    t0 = time.perf_counter()
    report = {
        "bench": "packing", "config": asdict(run), "target_speedup": 1.5,
        "cases": [run_case(run, preset, source) for preset, source in cases],
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu_name(),
                        "cores": os.cpu_count(), "python": platform.python_version(),
                        "attention_backend": ops.get_backend(), "threads_note": THREADS_NOTE},
    }
    report["elapsed_s"] = time.perf_counter() - t0
    out = ROOT / run.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "packing.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "packing.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out / 'packing.json'} and {out / 'packing.md'} ({report['elapsed_s']:.0f} s)")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _markdown(r: dict) -> str:
    env = r["environment"]

    def pct(x):
        return "—" if x is None else f"{100 * x:.0f} %"

    lines = [
        "# Sequence packing vs padding: training throughput (CPU)",
        "",
        f"`bench/packing.py` ({r['elapsed_s']:.0f} s). One step = forward + backward + AdamW with the SPEC §7 "
        f"trainable policy, `model.train()`. Each case uses the same {r['config']['samples']} samples in every "
        f"mode: padded batches of {r['config']['batch_size']}, packed batches under budgets of s x "
        f"{r['config']['batch_size']} x the mean sample size on each side, s the smallest multiple at which "
        f"packing needs no more steps than padding; {r['config']['repeats']} passes with "
        f"the steps of the modes interleaved, after {r['config']['warmup_steps']} warm-up steps per mode. "
        f"{env['cpu']}, torch {env['torch']}, attention backend `{env['attention_backend']}`, "
        f"{env['threads_note']}. Throughput = target tokens (labels != -100) per CPU-second of step time.",
        "",
        "| preset, lengths | padded | packed | **packed / padded** | packed, vectorised attention "
        "(experiment) | vision tower share of a padded step | packed / padded without it | samples / step "
        "| real / computed tokens enc, dec (padded) | budget fill enc, dec (packed) | loss check |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for c in r["cases"]:
        p, q, u = (c["results"][m] for m in ("padded", "packed", "packed-unpad"))
        pe, qe = p["efficiency"], q["efficiency"]
        sc, sw = c["speedup_cpu"], c["speedup_wall"]
        lines.append(
            f"| `{c['preset']}`, {c['source']} | {p['target_tokens_per_cpu_s']:.0f} "
            f"({p['target_tokens_per_wall_s']:.0f}) | {q['target_tokens_per_cpu_s']:.0f} "
            f"({q['target_tokens_per_wall_s']:.0f}) | **{sc['packed']:.2f}x** ({sw['packed']:.2f}x) | "
            f"{u['target_tokens_per_cpu_s']:.0f}: {sc['packed-unpad']:.2f}x ({sw['packed-unpad']:.2f}x) | "
            f"{pct(c['vision_share_of_padded_step'])} | {c['speedup_cpu_without_vision']['packed']:.2f}x | "
            f"{p['samples_per_step']:.1f} | {pct(pe['encoder']['efficiency'])}, "
            f"{pct(pe['decoder']['efficiency'])} | {pct(qe['encoder']['fill'])}, {pct(qe['decoder']['fill'])} | "
            f"{c['validation_max_loss_diff']:.0e} |")
    lines += ["", "Target tokens per CPU-second (per wall second in brackets). Packed batches carry no padding "
              "(real / computed = 100 % on both sides). The packed-unpad column runs the same packed batches "
              "with florenz_fast.ops' `dense` backend: packed attention gathered into one masked (N, max len) "
              "block per layer instead of the reference backend's per-segment Python loop (tests/test_ops.py "
              "holds it to the reference, forward and backward). Cases:", ""]
    for c in r["cases"]:
        L = c["lengths"]
        lines.append(
            f"- `{c['preset']}`, {c['source']}: {c['source_text']}; {c['n_image_tokens']} image tokens per "
            f"sample; mean prompt {L['mean_prompt_ids']:.1f} ids (max {L['max_prompt_ids']}), mean labels "
            f"{L['mean_decoder_tokens']:.1f} ids (max {L['max_label_ids']}); packed budgets "
            f"{c['budgets']['max_encoder_tokens']} / {c['budgets']['max_decoder_tokens']} tokens "
            f"(s = {c['budgets']['scale']:.2f}).")
    lines += ["", "Vision tower share: CPU time of the image-token pipeline (vision tower + projector, frozen by "
              "SPEC §7, the same images in every mode; measured with forward hooks during the timed steps) "
              "over the padded step time; 'without it' compares the step times with it subtracted.", "",
              f"Issue target: >= {r['target_speedup']}x. Loss check: largest difference of per-sample mean "
              "losses between the first packed batch and the padded collation of its samples (eval mode), "
              "checked before timing.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
