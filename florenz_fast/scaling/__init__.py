"""Scaling laws of captioning emergence, in miniature (issue 10; SPEC §8-§9).

    python -m florenz_fast.scaling                                   # the default CPU sweep (~40 min, 2 cores)
    python -m florenz_fast.scaling --sizes=gemma-0.24m,gemma-0.67m --budgets=400,800 --out=runs/mini
    python -m florenz_fast.scaling --device=cuda --sizes=gemma-1.4m,gemma-5.6m,gemma-22m --budgets=...
    python -m florenz_fast.scaling --pipeline=pretrained            # pretrained parts first (scaling.pipeline)

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

# The package, by concern (everything public is re-exported here: `from florenz_fast import scaling; scaling.fit_law`):
#   ladder.py  LADDER (the model sizes), model_config, count_config_parameters, the languages and loss GROUPS
#   sweep.py   SweepConfig, the shared tokenizers and held-out set, one run (train_config, init_checkpoint,
#              open_gates_checkpoint, train_run, evaluate_run), run_sweep and main (the CLI; __main__.py calls it)
#   fit.py     fit_law, predict, bootstrap, fits_for
#   report.py  build_report, markdown, plot, write_report, write_atomic
#   pipeline.py  the pretrained-parts miniature (issue 18; `--pipeline=pretrained`): stage A Florence-2, stage B
#              Gemma-2 language models, prepare, continued pre-training, evaluation with grounding, report
#   scenes.py  that pipeline's scene manifests, language-model text and grounding score (a per-language lexicon)

from .fit import PARAM_NAMES, bootstrap, fit_law, fits_for, predict
from .ladder import (
    ALL_LANGS,
    GROUP_NAMES,
    GROUPS,
    IN_LANGS,
    LADDER,
    UNSEEN_LANGS,
    count_config_parameters,
    model_config,
)
from .report import build_report, markdown, plot, write_atomic, write_report
from .sweep import (
    SweepConfig,
    detect_language,
    evaluate_run,
    init_checkpoint,
    language_words,
    main,
    open_gates_checkpoint,
    prepare_shared,
    run_name,
    run_sweep,
    train_config,
    train_run,
)

__all__ = [
    "ALL_LANGS", "GROUP_NAMES", "GROUPS", "IN_LANGS", "LADDER", "PARAM_NAMES", "UNSEEN_LANGS", "SweepConfig",
    "bootstrap", "build_report", "count_config_parameters", "detect_language", "evaluate_run", "fit_law", "fits_for",
    "init_checkpoint", "language_words", "main", "markdown", "model_config", "open_gates_checkpoint", "plot",
    "predict", "prepare_shared", "run_name", "run_sweep", "train_config", "train_run", "write_atomic",
    "write_report",
]
