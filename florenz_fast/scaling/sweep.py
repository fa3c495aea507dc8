"""Scaling laws of captioning emergence, in miniature (issue 10; SPEC §8-§9).

    python -m florenz_fast.scaling                                   # the default CPU sweep (~40 min, 2 cores)
    python -m florenz_fast.scaling --sizes=gemma-0.24m,gemma-0.67m --budgets=400,800 --out=runs/mini
    python -m florenz_fast.scaling --device=cuda --sizes=gemma-1.4m,gemma-5.6m,gemma-22m --budgets=...

A sweep over model sizes (a ladder of from-scratch Gemma-decoder models and one BART-decoder model) x seen
samples D. Every run is trained with `florenz_fast.train.train` (recipe `tiny`, AdamW, cosine to the run's own
end; from scratch, with the vision tower and image-token pipeline frozen at their random init as Florenz
freezes its pretrained ones, and the cross-attention gates opened, see SweepConfig) on the synthetic set in
which captioning exists only in en/de (fr/es appear only as translation targets, SPEC §8), all runs sharing
one tokenizer directory (<out>/tokenizers). Each run is
evaluated on held-out synthetic images (another seed) that carry captions in every language:

- loss groups (token-weighted cross-entropy by teacher forcing, `eval.records_losses`): in-distribution =
  caption-en/de, unseen = caption-fr/es (the languages withheld here; SPEC §9 names es/zh for the real data),
  translation = translate-*;
- caption BLEU / chrF per language (`eval.generate_texts`, `eval.bleu`, `eval.chrf`; SPEC §9 beam search),
  without and with the SPEC §6 caption prefix, plus the share of captions written in the asked-for language.

Then, per group, a fit of L(N, D) = E + A * N^-alpha + B * D^-beta over the Gemma ladder (N = all parameters,
the frozen vision tower included; D = samples seen), in log space with L-BFGS from a grid of starts (plain
torch), bootstrap confidence intervals (runs resampled with replacement) and a held-out check (fit without the
largest model, predict its losses). Written to <out>/report.json, report.md and PNGs, atomically.

Resumable: a run whose eval.json exists is skipped; an interrupted run resumes through train's own
checkpoints (<out>/runs/<run>/checkpoints), the same command finishes the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import FlorenzConfig, apply_overrides, get_config

# ---- the model ladder ---------------------------------------------------------------------------------------
# (kind, vision base width w -> DaViT dims (w, 2w, 4w, 8w), shared width d of projection/encoder/decoder,
#  encoder layers, decoder layers, heads). ffn = 2d everywhere; Gemma kv_heads = heads/2.
# Parameter counts (all parameters; all train from scratch) are computed from the built model.
LADDER: dict[str, tuple] = {
    "gemma-0.24m": ("gemma2", 8, 32, 1, 2, 2),
    "gemma-0.67m": ("gemma2", 12, 64, 2, 3, 4),
    "gemma-1.4m": ("gemma2", 16, 96, 2, 4, 4),
    "gemma-2.0m": ("gemma2", 16, 128, 3, 4, 4),
    "gemma-5.6m": ("gemma2", 24, 192, 4, 6, 4),
    "gemma-22m": ("gemma2", 32, 384, 6, 8, 8),  # GPU sizes: same command with --device=cuda
    "gemma-60m": ("gemma2", 48, 640, 8, 10, 10),
    "bart-0.64m": ("bart", 12, 64, 2, 2, 4),
}

IN_LANGS = ("en", "de")  # captioning seen in training (SPEC §8)
UNSEEN_LANGS = ("fr", "es")  # translation only in training; captions only in the held-out set
ALL_LANGS = IN_LANGS + UNSEEN_LANGS
GROUPS = {"in_distribution": tuple(f"caption-{lang}" for lang in IN_LANGS),
          "unseen": tuple(f"caption-{lang}" for lang in UNSEEN_LANGS)}
GROUP_NAMES = ("in_distribution", "unseen", "translation")


def model_config(size: str, image_size: int = 64) -> FlorenzConfig:
    """A FlorenzConfig for a ladder entry (vocabulary 512: the synthetic tokenizers)."""
    if size not in LADDER:
        raise KeyError(f"unknown size {size!r}; known: {', '.join(LADDER)}")
    kind, w, d, enc_layers, dec_layers, heads = LADDER[size]
    cfg = get_config("tiny" if kind == "gemma2" else "tiny-bart")
    cfg.name, cfg.image_size = size, image_size
    cfg.vision.dims, cfg.vision.projection_dim = (w, 2 * w, 4 * w, 8 * w), d
    e = cfg.encoder
    e.d_model, e.layers, e.heads, e.ffn = d, enc_layers, heads, 2 * d
    dec = cfg.decoder
    dec.hidden, dec.layers, dec.heads, dec.head_dim, dec.ffn, dec.encoder_width = d, dec_layers, heads, d // heads, 2 * d, d
    if kind == "gemma2":
        dec.kv_heads, dec.query_pre_attn_scalar = max(1, heads // 2), float(d // heads)
    else:
        dec.kv_heads = heads
    return cfg.validate()


def count_parameters(cfg: FlorenzConfig) -> int:
    from ..florenz import Florenz

    with torch.device("meta"):
        return sum(p.numel() for p in Florenz(cfg).parameters())


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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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


def evaluate_run(cfg: SweepConfig, final: Path, tok_dir: Path, records, vocab) -> dict:
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
            for prefix in (False, True):
                hyps = ev.generate_texts(pipe, items, "caption", lang, cfg.eval_batch_size,
                                         f"caption-{lang}{' +prefix' if prefix else ''}", prefix)
                refs = [it.refs for it in items]
                detected = [detect_language(h, vocab) for h in hyps]
                captions[f"{lang}{'+prefix' if prefix else ''}"] = {
                    "bleu": ev.bleu(hyps, refs, lang), "chrf": ev.chrf(hyps, refs),
                    "in_language": sum(d == lang for d in detected) / len(hyps),
                    "distinct": len(set(hyps)) / len(hyps), "n": len(hyps),
                    "examples": [{"hyp": h, "ref": r[0]} for h, r in zip(hyps[:2], refs[:2])]}
    return {"loss_groups": losses, "captions": captions}


def _device(cfg: SweepConfig) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def run_sweep(cfg: SweepConfig) -> dict:
    """Train and evaluate every (size, budget) run not finished yet, then fit, plot and write the report.
    The process's torch thread count is restored afterwards (a test suite runs this in-process: a leftover
    1-thread setting changed later tests' float results against their 2-thread subprocesses)."""
    saved_threads = torch.get_num_threads()
    try:
        return _run_sweep(cfg)
    finally:
        torch.set_num_threads(saved_threads)


def _run_sweep(cfg: SweepConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads and _device(cfg) == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    write_atomic(out / "sweep_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    tok_dir, records = prepare_shared(cfg, out)
    vocab = language_words(records)
    trained = 0
    results = []
    t_sweep = time.perf_counter()
    for size in cfg.size_list():
        n_params = count_parameters(model_config(size, cfg.image_size))
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


# ---- the fit ------------------------------------------------------------------------------------------------
# L(N, D) = E + A * N^-alpha + B * D^-beta, fitted as log L = logsumexp(e, a - alpha log N, b - beta log D)
# by least squares in log space (relative errors: the groups' losses differ by an order of magnitude), with
# L-BFGS from a grid of starts (the objective is non-convex; Chinchilla's approach 3, without the Huber term).

PARAM_NAMES = ("E", "A", "alpha", "B", "beta")


def _log_pred(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor) -> torch.Tensor:
    e, a, alpha, b, beta = theta.unbind(-1)
    terms = torch.stack([e.expand_as(logN), a - alpha * logN, b - beta * logD], -1)
    return torch.logsumexp(terms, -1)


def _lbfgs(theta0: torch.Tensor, logN, logD, logL, iters: int = 200) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((_log_pred(theta, logN, logD) - logL) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = float(((_log_pred(theta, logN, logD) - logL) ** 2).mean())
    return theta.detach(), loss if math.isfinite(loss) else float("inf")


def fit_law(N, D, L, starts: torch.Tensor | None = None) -> dict:
    """Fit L = E + A N^-alpha + B D^-beta to points (N, D, L); returns the constants and the fit's RMS error
    in log space. Needs at least 6 points with >= 2 distinct N and D."""
    N, D, L = (torch.as_tensor(x, dtype=torch.float64) for x in (N, D, L))
    if len(L) < 6 or len(set(N.tolist())) < 2 or len(set(D.tolist())) < 2:
        raise ValueError(f"fit_law: need >= 6 points over >= 2 sizes and >= 2 budgets, got {len(L)}")
    if (L <= 0).any():
        raise ValueError("fit_law: losses must be positive")
    logN, logD, logL = N.log(), D.log(), L.log()
    if starts is None:
        grid = torch.cartesian_prod(*(torch.tensor(v, dtype=torch.float64) for v in (
            [float(logL.min()) - 1.0, float(logL.min()) - 0.1],  # e = log E
            [0.0, 4.0, 8.0], [0.2, 0.6],  # a, alpha
            [0.0, 4.0, 8.0], [0.2, 0.6])))  # b, beta
        starts = grid
    best, best_loss = None, float("inf")
    for s in starts:
        theta, loss = _lbfgs(s, logN, logD, logL)
        if loss < best_loss and torch.isfinite(theta).all():
            best, best_loss = theta, loss
    if best is None:
        raise RuntimeError("fit_law: no start converged")
    e, a, alpha, b, beta = best.tolist()
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta,
            "rms_log_error": math.sqrt(best_loss), "theta": best.tolist()}


def predict(fit: dict, N, D) -> torch.Tensor:
    N, D = torch.as_tensor(N, dtype=torch.float64), torch.as_tensor(D, dtype=torch.float64)
    return _log_pred(torch.tensor(fit["theta"], dtype=torch.float64), N.log(), D.log()).exp()


def bootstrap(N, D, L, fit: dict, n: int, seed: int = 0) -> dict:
    """95 % percentile intervals of each constant over `n` refits on runs resampled with replacement (each
    refit starts from the full fit and from the grid's two best-spread starts)."""
    N, D, L = (torch.as_tensor(x, dtype=torch.float64) for x in (N, D, L))
    g = torch.Generator().manual_seed(seed)
    draws = []
    start = torch.tensor(fit["theta"], dtype=torch.float64)
    for _ in range(n):
        idx = torch.randint(len(L), (len(L),), generator=g)
        if len(set(N[idx].tolist())) < 2 or len(set(D[idx].tolist())) < 2 or len(set(idx.tolist())) < 6:
            continue
        try:
            f = fit_law(N[idx], D[idx], L[idx], starts=start[None])
        except (ValueError, RuntimeError):
            continue
        draws.append([f[k] for k in PARAM_NAMES])
    if not draws:
        return {"n": 0}
    t = torch.tensor(draws, dtype=torch.float64)
    lo, hi = torch.quantile(t, 0.025, dim=0), torch.quantile(t, 0.975, dim=0)
    return {"n": len(draws), **{k: [float(lo[i]), float(hi[i])] for i, k in enumerate(PARAM_NAMES)}}


def fits_for(rows: list[dict], group: str, n_boot: int) -> dict:
    """Fit, bootstrap and held-out check (fit without the largest model, predict it) for one loss group."""
    pts = [(r["params"], r["samples"], r["loss_groups"][group]) for r in rows
           if r["kind"] == "gemma2" and r["loss_groups"].get(group)]
    if not pts:
        return {"skipped": "no points"}
    N, D, L = zip(*pts)
    try:
        fit = fit_law(N, D, L)
    except ValueError as exc:
        return {"skipped": str(exc)}
    res = {"fit": fit, "points": len(pts), "bootstrap": bootstrap(N, D, L, fit, n_boot)}
    largest = max(N)
    train_pts = [p for p in pts if p[0] < largest]
    test_pts = [p for p in pts if p[0] == largest]
    try:
        small = fit_law(*zip(*train_pts))
        pred = predict(small, [p[0] for p in test_pts], [p[1] for p in test_pts]).tolist()
        res["held_out"] = {"params": largest, "fit_on_smaller": {k: small[k] for k in PARAM_NAMES},
                           "rows": [{"samples": p[1], "actual": p[2], "predicted": q, "rel_error": q / p[2] - 1}
                                    for p, q in zip(test_pts, pred)]}
        res["held_out"]["mean_abs_rel_error"] = sum(abs(r["rel_error"]) for r in res["held_out"]["rows"]) / len(pred)
    except ValueError as exc:
        res["held_out"] = {"skipped": str(exc)}
    return res


# ---- report -------------------------------------------------------------------------------------------------


def build_report(cfg: SweepConfig, rows: list[dict], seconds: float) -> dict:
    rows = sorted(rows, key=lambda r: (r["kind"] != "gemma2", r["params"], r["budget"]))
    fits = {g: fits_for(rows, g, cfg.bootstrap) for g in GROUP_NAMES}
    report = {"config": dataclasses.asdict(cfg), "form": "L(N, D) = E + A * N^-alpha + B * D^-beta "
              "(N = parameters, the frozen vision tower included; D = samples seen); least squares on log L, "
              "L-BFGS from a grid of starts",
              "runs": rows, "fits": fits, "sweep_seconds_this_invocation": seconds,
              "train_seconds_total": sum(r["train_seconds"] for r in rows),
              "eval_seconds_total": sum(r["eval_seconds"] for r in rows), "plots": []}
    return report


def _law_text(fit: dict) -> str:
    return (f"L = {fit['E']:.3f} + {fit['A']:.3g}·N^-{fit['alpha']:.3f} + {fit['B']:.3g}·D^-{fit['beta']:.3f}"
            f"  (rms log error {fit['rms_log_error']:.3f})")


def markdown(report: dict) -> str:
    lines = [f"# Scaling sweep: {len(report['runs'])} runs", "",
             f"Form: {report['form']}.", "",
             f"Time: {report['train_seconds_total']:.0f} s training + {report['eval_seconds_total']:.0f} s evaluation "
             f"(summed over runs, as recorded when each ran).", "", "## Fits (Gemma ladder)", ""]
    for g in GROUP_NAMES:
        f = report["fits"][g]
        if "fit" not in f:
            lines.append(f"- **{g}**: fit skipped ({f.get('skipped')})")
            continue
        lines.append(f"- **{g}**: {_law_text(f['fit'])}, {f['points']} runs")
        b = f["bootstrap"]
        if b.get("n"):
            lines.append("  - 95 % bootstrap CI (" + str(b["n"]) + " refits): " + ", ".join(
                f"{k} [{b[k][0]:.3g}, {b[k][1]:.3g}]" for k in PARAM_NAMES))
        h = f.get("held_out", {})
        if "rows" in h:
            lines.append(f"  - held-out check (fit without N={h['params']:,}, predict it): mean |rel. error| "
                         f"{h['mean_abs_rel_error']:.1%}; " + ", ".join(
                             f"D={r['samples']:.0f}: {r['predicted']:.3f} vs {r['actual']:.3f}" for r in h["rows"]))
        elif h:
            lines.append(f"  - held-out check skipped ({h.get('skipped')})")
    lines += ["", "## Runs", "",
              "| run | params | samples | in-dist | unseen | translation | " +
              " | ".join(f"BLEU {k}" for k in _caption_keys(report)) + " | " +
              " | ".join(f"in-lang {k}" for k in _caption_keys(report)) + " |",
              "|---|---:|---:|---:|---:|---:|" + "---:|" * (2 * len(_caption_keys(report)))]
    for r in report["runs"]:
        lg = r["loss_groups"]
        lines.append(f"| {r['run']} | {r['params']:,} | {r['samples']:.0f} | {lg['in_distribution']:.3f} | "
                     f"{lg['unseen']:.3f} | {lg['translation']:.3f} | " +
                     " | ".join(f"{r['captions'][k]['bleu']:.1f}" for k in _caption_keys(report)) + " | " +
                     " | ".join(f"{r['captions'][k]['in_language']:.0%}" for k in _caption_keys(report)) + " |")
    lines += ["", "BLEU = sacreBLEU corpus BLEU of the captions (one reference); `+prefix` = decoding continues the "
              "SPEC §6 caption prefix; in-lang = share of captions whose words belong to the asked-for language.", ""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


def _caption_keys(report: dict) -> list[str]:
    return list(report["runs"][0]["captions"]) if report["runs"] else []


def plot(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["runs"] if r["kind"] == "gemma2"]
    sizes = sorted({r["params"] for r in rows})
    names = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    cmap = plt.get_cmap("viridis")
    for ax, g in zip(axes, GROUP_NAMES):
        fit = report["fits"][g].get("fit")
        for i, n in enumerate(sizes):
            pts = sorted((r["samples"], r["loss_groups"][g]) for r in rows if r["params"] == n)
            color = cmap(i / max(1, len(sizes) - 1))
            ax.plot(*zip(*pts), "o", color=color, label=f"N={n / 1e6:.2f}M")
            if fit:
                ds = torch.logspace(math.log10(pts[0][0]), math.log10(pts[-1][0]), 50, dtype=torch.float64)
                ax.plot(ds, predict(fit, torch.full_like(ds, n), ds), "-", color=color, alpha=0.7)
        for r in report["runs"]:
            if r["kind"] != "gemma2":
                ax.plot(r["samples"], r["loss_groups"][g], "x", color="red",
                        label=f"{r['size']}" if r["budget"] == min(x["budget"] for x in report["runs"]
                                                                    if x["size"] == r["size"]) else None)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("samples seen D"), ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{g}" + (f": α={fit['alpha']:.2f}, β={fit['beta']:.2f}" if fit else " (no fit)"))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_samples.png.tmp.png", dpi=110)
    os.replace(out / "loss_vs_samples.png.tmp.png", out / "loss_vs_samples.png")
    plt.close(fig)
    names.append("loss_vs_samples.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, n in enumerate(sizes):
        color = cmap(i / max(1, len(sizes) - 1))
        pts = sorted((r["samples"], r["loss_groups"]["in_distribution"], r["loss_groups"]["unseen"])
                     for r in rows if r["params"] == n)
        d, ind, uns = zip(*pts)
        axes[0].plot(d, ind, "o--", color=color, label=f"in-dist N={n / 1e6:.2f}M")
        axes[0].plot(d, uns, "s-", color=color, label=f"unseen N={n / 1e6:.2f}M")
        bl = sorted((r["samples"], r["captions"].get("fr+prefix", {}).get("bleu", 0.0),
                     r["captions"].get("en", {}).get("bleu", 0.0)) for r in rows if r["params"] == n)
        axes[1].plot([b[0] for b in bl], [b[2] for b in bl], "o--", color=color, label=f"en N={n / 1e6:.2f}M")
        axes[1].plot([b[0] for b in bl], [b[1] for b in bl], "s-", color=color, label=f"fr+prefix N={n / 1e6:.2f}M")
    axes[0].set_xscale("log"), axes[0].set_yscale("log")
    axes[0].set_xlabel("samples seen D"), axes[0].set_ylabel("caption loss (nats/token)")
    axes[0].set_title("unseen (fr, es; squares) vs in-distribution (en, de; circles)")
    axes[1].set_xscale("log"), axes[1].set_xlabel("samples seen D"), axes[1].set_ylabel("caption BLEU")
    axes[1].set_title("caption BLEU: en vs fr (with prefix)")
    for ax in axes:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "unseen_vs_in_distribution.png.tmp.png", dpi=110)
    os.replace(out / "unseen_vs_in_distribution.png.tmp.png", out / "unseen_vs_in_distribution.png")
    plt.close(fig)
    names.append("unseen_vs_in_distribution.png")
    return names


def write_report(report: dict, out: Path) -> None:
    if any(r["kind"] == "gemma2" for r in report["runs"]):
        report["plots"] = plot(report, out)
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "report.md", markdown(report))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("options (--key=value):", ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(SweepConfig)))
        return 0
    try:
        cfg = apply_overrides(SweepConfig(), argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_sweep(cfg)
    return 0
