"""The sweep: SweepConfig, the data all runs share, one run (train config, init checkpoint with open gates,
train, evaluate), run_sweep (resumable) and the command line (`python -m florenz_fast.scaling`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .ladder import ALL_LANGS, GROUPS, LADDER, count_config_parameters, model_config
from .report import build_report, markdown, write_atomic, write_report

# ---- the sweep config -----------------------------------------------------------------------------------------


@dataclass
class SweepConfig:
    sizes: str = "gemma-0.24m,gemma-0.67m,gemma-1.4m,gemma-2.0m,gemma-5.6m,bart-0.64m"
    budgets: str = "1500,3000,6000,12000"  # samples seen per run (steps = ceil(budget / batch_size))
    out: str = "runs/scaling"
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 1  # torch threads per run on CPU (0: leave torch's default)
    batch_size: int = 16  # samples per step (padded batches)
    lr: float = 2e-3
    image_size: int = 64
    train_images: int = 512  # synthetic training images (seed `seed`)
    eval_images: int = 48  # held-out images (seed `eval_seed`), captions in en/de/fr/es + translations
    seed: int = 0
    eval_seed: int = 1000
    num_beams: int = 4
    max_new_tokens: int = 40
    eval_batch_size: int = 48
    bootstrap: int = 200
    # From scratch, a cross-attention gate at 0 (tanh 0 = 0; the Gemma presets' init, right for a pretrained
    # decoder) leaves the decoder an unconditional language model: in a first reduced sweep the gates stayed
    # |g| < 0.06 over 200 steps, caption-XX and translate-XX losses agreed to 1e-9 and every image and prompt
    # got the same caption. The sweep therefore starts Gemma runs from an init checkpoint with every gate at
    # `gate_init` (tanh 1 = 0.76); 0 = the engine's own init.
    gate_init: float = 1.0
    # train's trainable. From scratch with "all", the vision tower trained at the run's learning rate blew its
    # features up to an image-independent vector within 300 steps (|common| 7.7 -> 220 on a colour probe) and
    # no run of the first sweeps ever told two images apart (one caption for all 48 held-out images). Frozen at
    # init ("no_vision") the image tokens keep their spread: the probe of tests/test_scaling gets 0.975 exact
    # (0.44 with the vision tower trained).
    trainable: str = "no_vision"
    caption_prefix: bool = False  # train caption targets with the SPEC §6 prefix (train's data.caption_prefix)
    stop_after_runs: int = 0  # end after this many newly trained runs (tests simulate an interruption); 0 = all

    def size_list(self) -> list[str]:
        sizes = [s.strip() for s in self.sizes.split(",") if s.strip()]
        for s in sizes:
            if s not in LADDER:
                raise ValueError(f"--sizes: unknown size {s!r}; known: {', '.join(LADDER)}")
        return sizes

    def budget_list(self) -> list[int]:
        try:
            budgets = sorted({int(b) for b in self.budgets.split(",") if b.strip()})
        except ValueError:
            raise ValueError(f"--budgets must be comma-separated integers, got {self.budgets!r}") from None
        if not budgets or budgets[0] < 1:
            raise ValueError(f"--budgets must hold positive sample counts, got {self.budgets!r}")
        return budgets

    def validate(self) -> "SweepConfig":
        self.size_list(), self.budget_list()
        if self.batch_size < 1 or self.eval_images < 2 or self.train_images < 1:
            raise ValueError("batch_size, train_images must be >= 1 and eval_images >= 2")
        return self


def run_name(size: str, budget: int) -> str:
    return f"{size}-d{budget}"


# ---- shared data: tokenizers and the held-out set --------------------------------------------------------------


def prepare_shared(cfg: SweepConfig, out: Path) -> tuple[Path, list]:
    """<out>/tokenizers (trained on the training records, built once) and the held-out records, their images
    written to <out>/heldout/ (generation reads image files)."""
    from ..data import Record, build_synthetic_tokenizers, synthetic_records

    tok = out / "tokenizers"
    if not (tok / "decoder" / "tokenizer.json").is_file():
        train_records = synthetic_records(cfg.train_images, cfg.seed, cfg.image_size)
        tmp = out / "tokenizers.tmp"
        build_synthetic_tokenizers(tmp, train_records)
        if tok.exists():  # a half-written directory from an interrupted start
            import shutil

            shutil.rmtree(tok)
        tmp.replace(tok)
    held = synthetic_records(cfg.eval_images, cfg.eval_seed, cfg.image_size, langs=ALL_LANGS,
                             caption_langs=ALL_LANGS, detailed=False)
    img_dir = out / "heldout"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, rec in enumerate(held):
        path = img_dir / f"{i:04d}.png"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(rec.image)
            tmp.replace(path)
        records.append(Record(image=path, annotations=rec.annotations, name=rec.name))
    return tok, records


def language_words(records) -> dict[str, set[str]]:
    """Per language, the words that occur only in that language's targets (a language detector for the
    synthetic grammar: a caption's language = the one most of its exclusive words belong to)."""
    words: dict[str, set[str]] = {}
    for rec in records:
        for ann in rec.annotations:
            words.setdefault(ann.lang, set()).update(_words(ann.target))
    return {lang: ws - set().union(*(o for other, o in words.items() if other != lang)) for lang, ws in words.items()}


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def detect_language(text: str, vocab: dict[str, set[str]]) -> str | None:
    hits = {lang: sum(w in ws for w in _words(text)) for lang, ws in vocab.items()}
    best = max(hits, key=hits.get) if hits else None
    return best if best is not None and hits[best] > 0 else None


# ---- one run ------------------------------------------------------------------------------------------------


def train_config(cfg: SweepConfig, size: str, budget: int, out: Path, tok_dir: Path):
    from ..train import recipe

    tc = recipe("tiny")  # from scratch
    tc.preset, tc.model = size, model_config(size, cfg.image_size)
    tc.trainable = cfg.trainable
    tc.steps = max(1, math.ceil(budget / cfg.batch_size))
    tc.out, tc.device, tc.seed = str(out), cfg.device, cfg.seed
    tc.save_every = max(1, tc.steps // 2)  # one mid-run checkpoint to resume from, plus the last step
    tc.log_every = 10 ** 9
    tc.data.tokenizers = str(tok_dir)
    tc.data.synthetic_images, tc.data.caption_prefix = cfg.train_images, cfg.caption_prefix
    # padded: exactly batch_size samples per step, so D is exact (train's packed loader caps tokens, not samples)
    tc.data.mode, tc.data.batch_size = "padded", cfg.batch_size
    tc.optim.lr = cfg.lr
    tc.optim.warmup_steps = max(1, min(20, tc.steps // 10))
    return tc


def init_checkpoint(cfg: SweepConfig, size: str, path: Path) -> str:
    """For Gemma sizes with gate_init != 0: the fresh model (seed `cfg.seed`, as train would build it) with its
    cross-attention gates set to gate_init, exported to `path` (train's --init); "" otherwise."""
    mcfg = model_config(size, cfg.image_size)
    if mcfg.decoder.kind != "gemma2" or cfg.gate_init == 0:
        return ""
    return open_gates_checkpoint(mcfg, cfg.seed, cfg.gate_init, path)


def open_gates_checkpoint(mcfg, seed: int, gate_init: float, path: Path) -> str:
    """A fresh Gemma-decoder model (torch.manual_seed(seed), as train builds it) with every cross-attention gate at
    `gate_init`, exported to `path` (config.json + safetensors) unless it is there already; returns the path."""
    from ..checkpoint import save_state_dict
    from ..convert import CONFIG_NAME
    from ..florenz import Florenz

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        torch.manual_seed(seed)
        model = Florenz(mcfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("encoder_attn_gate"):
                    p.fill_(gate_init)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        save_state_dict(model.state_dict(), tmp, metadata={"writer": "florenz-fast scaling init",
                                                           "gate_init": str(gate_init)})
        (tmp / CONFIG_NAME).write_text(json.dumps(mcfg.to_dict(), indent=2) + "\n")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(path)
    return str(path)


def train_run(tc) -> dict:
    """Train (or resume) one run; a separate function so tests can count calls."""
    from ..train import train

    return train(tc)


def evaluate_run(cfg: SweepConfig, final: Path, tok_dir: Path, records, vocab, *, prefixes=(False, True),
                 score=None) -> dict:
    """Loss groups and, per language (and per prefix setting in `prefixes`), the captions' BLEU / chrF,
    in-language and distinct shares; `score(lang, hyps)` (optional) adds its dict to each caption entry."""
    from .. import eval as ev
    from ..generate import load_pipeline

    device = _device(cfg)
    pipe = load_pipeline(final, tokenizers=tok_dir, device=device)
    pipe.model.eval()
    pipe.config = dataclasses.replace(pipe.config, num_beams=cfg.num_beams,
                                      max_new_tokens=cfg.max_new_tokens).validate()
    with torch.inference_mode():
        losses = ev.records_losses(pipe, records, cfg.eval_batch_size, groups=GROUPS)
        captions: dict = {}
        for lang in ALL_LANGS:
            items = [ev.Item(image=Path(rec.image), refs=[a.target for a in rec.annotations
                                                          if a.task == "caption" and a.lang == lang])
                     for rec in records]
            for prefix in prefixes:
                hyps = ev.generate_texts(pipe, items, "caption", lang, cfg.eval_batch_size,
                                         f"caption-{lang}{' +prefix' if prefix else ''}", prefix)
                captions[f"{lang}{'+prefix' if prefix else ''}"] = {
                    **caption_metrics(hyps, [it.refs for it in items], lang, vocab),
                    **(score(lang, hyps) if score is not None else {})}
    return {"loss_groups": losses, "captions": captions}


def caption_metrics(hyps: list[str], refs: list[list[str]], lang: str, vocab) -> dict:
    """BLEU, chrF, the share of captions in `lang` (detect_language over `vocab`), the share of distinct ones."""
    from .. import eval as ev

    detected = [detect_language(h, vocab) for h in hyps]
    return {"bleu": ev.bleu(hyps, refs, lang), "chrf": ev.chrf(hyps, refs),
            "in_language": sum(d == lang for d in detected) / len(hyps),
            "distinct": len(set(hyps)) / len(hyps), "n": len(hyps),
            "examples": [{"hyp": h, "ref": r[0]} for h, r in zip(hyps[:2], refs[:2])]}


def _device(cfg) -> str:
    """cfg.device with "auto" resolved (a SweepConfig or the pipeline's PipelineConfig)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


@contextlib.contextmanager
def run_threads(cfg):
    """cfg.threads torch threads on the CPU for a run (0: torch's default) and denormals flushed; the process's
    thread count is restored afterwards (a test suite runs sweeps in-process: a leftover 1-thread setting changed
    later tests' float results against their 2-thread subprocesses)."""
    saved = torch.get_num_threads()
    try:
        if cfg.threads and _device(cfg) == "cpu":
            torch.set_num_threads(cfg.threads)
        torch.set_flush_denormal(True)
        yield
    finally:
        torch.set_num_threads(saved)


def run_sweep(cfg: SweepConfig) -> dict:
    """Train and evaluate every (size, budget) run not finished yet, then fit, plot and write the report."""
    cfg.validate()
    with run_threads(cfg):
        return _run_sweep(cfg)


def _run_sweep(cfg: SweepConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "sweep_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tok_dir, records = prepare_shared(cfg, out)
    vocab = language_words(records)
    trained = 0
    results = []
    t_sweep = time.perf_counter()
    for size in cfg.size_list():
        n_params = count_config_parameters(model_config(size, cfg.image_size))
        for budget in cfg.budget_list():
            name = run_name(size, budget)
            run_dir = out / "runs" / name
            eval_path = run_dir / "eval.json"
            if eval_path.is_file():
                results.append(json.loads(eval_path.read_text()))
                print(f"[scaling] {name}: done before, skipped")
                continue
            if cfg.stop_after_runs and trained >= cfg.stop_after_runs:
                print(f"[scaling] stopping after {trained} trained run(s) (stop_after_runs)")
                return {"stopped": True, "trained": trained}
            print(f"[scaling] {name}: {n_params:,} parameters, {budget} samples")
            tc = train_config(cfg, size, budget, run_dir, tok_dir)
            tc.init = init_checkpoint(cfg, size, out / "init" / size)
            t0 = time.perf_counter()
            summary = train_run(tc)
            t_train = time.perf_counter() - t0
            trained += 1
            final = run_dir / "final"
            if not (final / "config.json").is_file():
                raise RuntimeError(f"{name}: training ended without {final}/config.json")
            samples = sum(json.loads(line)["samples"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                          if line.strip())
            t0 = time.perf_counter()
            ev = evaluate_run(cfg, final, tok_dir, records, vocab)
            row = {"run": name, "size": size, "kind": LADDER[size][0], "params": n_params, "budget": budget,
                   "samples": samples, "steps": tc.steps, "resumed_from_step": summary["start_step"],
                   "train_seconds": t_train, "eval_seconds": time.perf_counter() - t0,
                   "final_train_loss": summary["losses"][-1] if summary["losses"] else None, **ev}
            write_atomic(eval_path, json.dumps(row, indent=2, ensure_ascii=False) + "\n")
            results.append(row)
            lg = ev["loss_groups"]
            print(f"[scaling] {name}: in-dist {lg['in_distribution']:.3f}  unseen {lg['unseen']:.3f}  "
                  f"translation {lg['translation']:.3f}  ({t_train:.0f} s train, {row['eval_seconds']:.0f} s eval)")
    report = build_report(cfg, results, time.perf_counter() - t_sweep)
    write_report(report, out)
    print(markdown(report))
    return report



def main(argv: list[str] | None = None) -> int:
    """`python -m florenz_fast.scaling --key=value ...` through the engine's one CLI layer (--help lists the keys);
    `--pipeline=pretrained` (first or anywhere) runs the pretrained-parts pipeline instead (scaling.pipeline)."""
    from .. import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    choice = [a for a in argv if a.startswith("--pipeline=") or a.startswith("pipeline=")]
    if choice:
        value = choice[-1].split("=", 1)[1]
        rest = [a for a in argv if a not in choice]
        if value == "pretrained":
            from .pipeline import main as pipeline_main

            return pipeline_main(rest)
        if value != "scratch":
            return cli.report(ValueError(f"--pipeline must be scratch (the default: the from-scratch sweep) or "
                                         f"pretrained, got {value!r}"), cli.USAGE)
        argv = rest
    return cli.main(SweepConfig, run_sweep, argv, prog="python -m florenz_fast.scaling",
                    description=sys.modules[__package__].__doc__)
