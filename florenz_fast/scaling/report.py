"""The sweep's report: report.json, report.md (tables of the runs and fits) and the PNG plots, written
atomically."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .fit import PARAM_NAMES, fits_for, predict
from .ladder import GROUP_NAMES

if TYPE_CHECKING:
    from .sweep import SweepConfig


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)



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
