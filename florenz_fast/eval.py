"""Evaluation (SPEC §9): translation and captioning metrics, CoMMuTE disambiguation, the scaling-law loss groups.

    python -m florenz_fast.eval --ckpt=DIR --out=report/ \
        --multi30k=multi30k-dataset/data/task1 --flickr30k_images=flickr30k/ --mscoco_images=coco/ \
        --multi30k_task2=multi30k-dataset/data/task2 \
        --commute=CoMMuTE/ --xm3600=captions.jsonl --xm3600_images=xm3600/ \
        --coco_karpathy=dataset_coco.json --coco_images=coco/ --loss_manifest=val.jsonl
    python -m florenz_fast.eval --help      # every option (EvalConfig) with its default

Local copies in their published layouts (text files may be gzipped, `NAME.gz`):
  Multi30K task 1 (translation en→de/fr): DIR/raw/{split}.{en,de,fr}, DIR/image_splits/{split}.txt (one image
    file name per line), splits test_2016_flickr, test_2017_flickr, test_2018_flickr (Flickr30k images) and
    test_2017_mscoco (COCO images); splits or languages whose files are absent are skipped.
  Multi30K task 2 (captioning en/de, 5 independent references): DIR/raw/test_2016.{1..5}.{en,de},
    DIR/image_splits/test_2016.txt.
  CoMMuTE (en→de/fr/ru/zh): DIR/en-XX/{src.en, correct.XX, incorrect.XX, img.XX} (one item per line, img = image
    file name), images in DIR/images/.
  XM3600: captions.jsonl rows {"image/key": K, "en": {"caption": [...]}, "de": {...}, ...}; images IMAGES/K.jpg.
  COCO Karpathy: dataset_coco.json {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]};
    split "test" (5,000 images), images at IMAGES/filepath/filename.
  Loss groups: a JSONL manifest (florenz_fast.data.read_manifest rows {image, task, lang, source, target}).

Metrics: sacreBLEU corpus BLEU (tokenize "zh" for Chinese, "13a" otherwise) and chrF for translation; BLEU-4
(the same sacreBLEU call, every reference of an item) and CIDEr-D for captioning; CoMMuTE accuracy = share of
items whose correct translation has lower perplexity than the incorrect one, given image and source; the
scaling-law groups = token-weighted mean cross-entropy over in-distribution (caption en, de), unseen (caption
es, zh) and translation rows. Hypotheses are generated with SPEC §9's beam search and capitalised.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import cli

SPLITS_TASK1 = {"test_2016_flickr": "flickr", "test_2017_flickr": "flickr", "test_2018_flickr": "flickr",
                "test_2017_mscoco": "mscoco"}


@dataclass
class Item:
    image: Path
    refs: list[str]
    src: str | None = None  # translation source
    extra: dict = field(default_factory=dict)


# ---- readers ---------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    """Lines of a text file or of its .gz copy (whichever exists); errors name the path."""
    for p in (path, path.with_name(path.name + ".gz")):
        if p.is_file():
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt", encoding="utf-8") as f:
                return [line.rstrip("\n").rstrip("\r") for line in f]
    raise FileNotFoundError(f"{path}: no such file (nor {path.name}.gz)")


def _exists(path: Path) -> bool:
    return path.is_file() or path.with_name(path.name + ".gz").is_file()


def _aligned(files: dict[str, list[str]]) -> None:
    lengths = {name: len(lines) for name, lines in files.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"files differ in line count: {lengths}")


def read_multi30k_task1(root, split: str, tgt: str, images) -> list[Item]:
    root, images = Path(root), Path(images)
    src = read_lines(root / "raw" / f"{split}.en")
    ref = read_lines(root / "raw" / f"{split}.{tgt}")
    names = read_lines(root / "image_splits" / f"{split}.txt")
    _aligned({f"{split}.en": src, f"{split}.{tgt}": ref, f"image_splits/{split}.txt": names})
    return [Item(image=images / n.strip(), refs=[r], src=s) for s, r, n in zip(src, ref, names)]


def read_multi30k_task2(root, lang: str, images, split: str = "test_2016") -> list[Item]:
    root, images = Path(root), Path(images)
    refs = [read_lines(root / "raw" / f"{split}.{i}.{lang}") for i in range(1, 6)]
    names = read_lines(root / "image_splits" / f"{split}.txt")
    _aligned({**{f"{split}.{i + 1}.{lang}": r for i, r in enumerate(refs)}, f"{split}.txt": names})
    return [Item(image=images / n.strip(), refs=[r[j] for r in refs]) for j, n in enumerate(names)]


def read_commute(root, tgt: str) -> list[Item]:
    root = Path(root)
    d = root / f"en-{tgt}"
    files = {name: read_lines(d / name) for name in ("src.en", f"correct.{tgt}", f"incorrect.{tgt}", f"img.{tgt}")}
    _aligned({str(d / k): v for k, v in files.items()})
    return [Item(image=root / "images" / img.strip(), refs=[c], src=s, extra={"incorrect": w})
            for s, c, w, img in zip(files["src.en"], files[f"correct.{tgt}"], files[f"incorrect.{tgt}"],
                                    files[f"img.{tgt}"])]


def read_xm3600(path, images, lang: str) -> list[Item]:
    path, images = Path(path), Path(images)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, caps = row["image/key"], row[lang]["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not an XM3600 row with 'image/key' and '{lang}'.caption ({exc!r})") from None
        out.append(Item(image=images / f"{key}.jpg", refs=list(caps)))
    return out


def read_coco_karpathy(path, images, split: str = "test") -> list[Item]:
    path, images = Path(path), Path(images)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [im for im in data["images"] if im["split"] == split]
        return [Item(image=images / im.get("filepath", "") / im["filename"], refs=[s["raw"] for s in im["sentences"]])
                for im in rows]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a Karpathy split file ({exc!r})") from None


# ---- metrics ---------------------------------------------------------------------------------------------


def _ref_streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacreBLEU's layout: one stream per reference index, None where an item has fewer references."""
    n = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(n)]


def bleu(hyps: list[str], refs: list[list[str]], lang: str) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, _ref_streams(refs), tokenize="zh" if lang == "zh" else "13a").score


def chrf(hyps: list[str], refs: list[list[str]]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(hyps, _ref_streams(refs)).score


def caption_tokens(text: str, lang: str = "en") -> list[str]:
    """CIDEr tokenisation: lower-case, punctuation removed, whitespace split; Chinese one token per character
    (coco-caption's PTB tokenizer is Java-only; this is the same idea for the languages here)."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    if lang == "zh":
        return [c for c in text if not c.isspace()]
    return text.split()


def _ngrams(tokens: list[str], n_max: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


def cider_d(hyps: list[str], refs: list[list[str]], lang: str = "en", n_max: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as coco-caption computes it), x10, mean over images.

    Per n-gram order n: tf-idf vectors (term count x (log N_images - log max(1, document frequency)), document
    frequency = number of images whose references contain the n-gram); similarity = sum over n-grams of
    min(hyp, ref) * ref / (|hyp| |ref|) (the 'D': clipped counts), times exp(-(l_hyp - l_ref)^2 / (2 sigma^2))
    where l is the number of bigrams (coco-caption's length), averaged over n and the image's references.
    """
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"cider_d: {len(hyps)} hypotheses for {len(refs)} reference lists")
    ref_counts = [[_ngrams(caption_tokens(r, lang), n_max) for r in rs] for rs in refs]
    hyp_counts = [_ngrams(caption_tokens(h, lang), n_max) for h in hyps]
    df = Counter(g for rcs in ref_counts for g in set().union(*[set(c) for c in rcs]))
    log_n = math.log(float(len(hyps)))

    def vec(counts: Counter):
        v = [dict() for _ in range(n_max)]
        norm = [0.0] * n_max
        length = 0
        for g, tf in counts.items():
            w = tf * (log_n - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
            if len(g) == 2:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for hc, rcs in zip(hyp_counts, ref_counts):
        vh, nh, lh = vec(hc)
        score = 0.0
        for rc in rcs:
            vr, nr, lr = vec(rc)
            per_n = 0.0
            for n in range(n_max):
                val = sum(min(w, vr[n][g]) * vr[n][g] for g, w in vh[n].items() if g in vr[n])
                if nh[n] and nr[n]:
                    val /= nh[n] * nr[n]
                per_n += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            score += per_n / n_max
        total += score / len(rcs) * 10.0
    return total / len(hyps)


LOSS_GROUPS = {"in_distribution": ("caption-en", "caption-de"), "unseen": ("caption-es", "caption-zh")}


def loss_groups(keys: list[str], nll_sums: list[float], counts: list[int], groups: dict | None = None) -> dict:
    """SPEC §9 scaling-law groups: token-weighted mean cross-entropy per group and per key.

    `groups` (name -> member keys) replaces LOSS_GROUPS, e.g. when other languages are held out (the
    synthetic set withholds fr/es captions); "translation" (every translate-* key) is always added."""
    per_key: dict[str, list[float]] = {}
    for k, s, c in zip(keys, nll_sums, counts):
        acc = per_key.setdefault(k, [0.0, 0])
        acc[0] += s
        acc[1] += c
    out = {"per_key": {k: v[0] / v[1] for k, v in sorted(per_key.items())}}
    groups = {**(LOSS_GROUPS if groups is None else groups),
              "translation": tuple(k for k in per_key if k.startswith("translate-"))}
    for g, members in groups.items():
        s = sum(per_key[k][0] for k in members if k in per_key)
        c = sum(per_key[k][1] for k in members if k in per_key)
        out[g] = s / c if c else None
    return out


# ---- running a model -------------------------------------------------------------------------------------


def generate_texts(pipe, items: list[Item], task: str, lang: str, batch_size: int, desc: str,
                   prefix: bool, continuous: bool = False) -> list[str]:
    """Hypotheses for `items` (image files) with SPEC §9's search; `prefix` continues the SPEC §6 caption prefix.
    `continuous`: batch_size slots kept full by continuous batching (Pipeline.generate_continuous); a request's
    failure (an unreadable image) is raised, as the static path raises it."""
    from tqdm import tqdm

    from .generate import Request, check_request

    reqs = [Request(image=it.image, task=task, lang=lang, src=it.src) for it in items]
    for i, r in enumerate(reqs):
        check_request(r, f"{desc} item {i}")
    if continuous and reqs:
        with tqdm(total=len(reqs), desc=desc, unit="img") as bar:
            rows = pipe.generate_continuous(reqs, slots=batch_size, prefix=prefix,
                                            on_row=lambda i, row: bar.update(1))
        for row in rows:
            if isinstance(row, BaseException):
                raise row
        return [row["text"] for row in rows]
    hyps = []
    for s in tqdm(range(0, len(reqs), batch_size), desc=desc, unit="batch"):
        hyps += [row["text"] for row in pipe.generate(reqs[s:s + batch_size], prefix=prefix)]
    return hyps



def commute_accuracy(pipe, items: list[Item], tgt: str, batch_size: int = 16) -> dict:
    from .text import prompt_for

    triples = []
    for it in items:
        prompt = prompt_for("translate", tgt, it.src)
        triples += [(it.image, prompt, it.refs[0]), (it.image, prompt, it.extra["incorrect"])]
    scores = pipe.score(triples, batch_size=batch_size)
    wins = [scores[2 * i]["perplexity"] < scores[2 * i + 1]["perplexity"] for i in range(len(items))]
    return {"accuracy": sum(wins) / len(wins), "items": len(wins), "correct": sum(wins)}


def evaluate(pipe, args: "EvalConfig") -> dict:
    report: dict = {"translation": {}, "captioning": {}, "commute": {}, "loss_groups": None}
    bs, lim = args.batch_size, args.limit
    cont = getattr(args, "continuous", False)

    def take(items):
        return items[:lim] if lim else items

    def add_translation(name, items, tgt):
        items = take(items)
        hyps = generate_texts(pipe, items, "translate", tgt, bs, name, False, cont)
        refs = [it.refs for it in items]
        report["translation"][name] = {"bleu": bleu(hyps, refs, tgt), "chrf": chrf(hyps, refs), "n": len(items)}
        return hyps

    def add_caption(name, items, lang):
        items = take(items)
        hyps = generate_texts(pipe, items, "caption", lang, bs, name, args.prefix, cont)
        refs = [it.refs for it in items]
        report["captioning"][name] = {"bleu4": bleu(hyps, refs, lang), "cider": cider_d(hyps, refs, lang),
                                      "n": len(items)}

    if args.multi30k:
        for split, source in SPLITS_TASK1.items():
            images = args.flickr30k_images if source == "flickr" else args.mscoco_images
            for tgt in ("de", "fr"):
                raw = Path(args.multi30k) / "raw"
                if not (_exists(raw / f"{split}.en") and _exists(raw / f"{split}.{tgt}")):
                    continue
                if not images:
                    raise cli.UsageError(f"--multi30k {split} needs "
                                         f"--{'flickr30k' if source == 'flickr' else 'mscoco'}-images")
                add_translation(f"multi30k/{split}/en-{tgt}", read_multi30k_task1(args.multi30k, split, tgt, images),
                                tgt)
    if args.multi30k_task2:
        if not args.flickr30k_images:
            raise cli.UsageError("--multi30k-task2 needs --flickr30k-images")
        for lang in ("en", "de"):
            add_caption(f"multi30k-task2/{lang}", read_multi30k_task2(args.multi30k_task2, lang, args.flickr30k_images),
                        lang)
    if args.commute:
        for tgt in ("de", "fr", "ru", "zh"):
            if not (Path(args.commute) / f"en-{tgt}").is_dir():
                continue
            items = take(read_commute(args.commute, tgt))
            add_translation(f"commute/en-{tgt}", items, tgt)
            report["commute"][f"en-{tgt}"] = commute_accuracy(pipe, items, tgt, bs)
    if args.xm3600:
        if not args.xm3600_images:
            raise cli.UsageError("--xm3600 needs --xm3600-images")
        for lang in args.xm3600_langs.split(","):
            add_caption(f"xm3600/{lang}", read_xm3600(args.xm3600, args.xm3600_images, lang), lang)
    if args.coco_karpathy:
        if not args.coco_images:
            raise cli.UsageError("--coco-karpathy needs --coco-images")
        add_caption("coco-karpathy/test", read_coco_karpathy(args.coco_karpathy, args.coco_images), "en")
    if args.loss_manifest:
        report["loss_groups"] = manifest_losses(pipe, args.loss_manifest, bs, lim)
    return report


def manifest_losses(pipe, path, batch_size: int, limit: int = 0) -> dict:
    from .data import DataStats, read_manifest

    records = read_manifest(path, DataStats())
    if not records:
        raise ValueError(f"{path}: no usable rows for the loss groups")
    return records_losses(pipe, records, batch_size, limit)


def records_losses(pipe, records, batch_size: int, limit: int = 0, groups: dict | None = None) -> dict:
    """Loss groups (see `loss_groups`) of data.Record rows scored by teacher forcing: every annotation's target
    given its image and SPEC §6 prompt."""
    from .text import prompt_for

    triples, keys = [], []
    for rec in records:
        for ann in rec.annotations:
            triples.append((rec.image, prompt_for(ann.task, ann.lang, ann.source), ann.target))
            keys.append(ann.key)
    if limit:
        triples, keys = triples[:limit], keys[:limit]
    if not triples:
        raise ValueError("records_losses: no annotations to score")
    scores = pipe.score(triples, batch_size=batch_size)
    return loss_groups(keys, [-s["logprob"] for s in scores], [s["tokens"] for s in scores], groups)


def markdown(report: dict) -> str:
    lines = ["| set | metric | value | n |", "|---|---|---:|---:|"]
    for name, r in report["translation"].items():
        lines += [f"| {name} | BLEU | {r['bleu']:.2f} | {r['n']} |", f"| {name} | chrF | {r['chrf']:.2f} | {r['n']} |"]
    for name, r in report["captioning"].items():
        lines += [f"| {name} | BLEU-4 | {r['bleu4']:.2f} | {r['n']} |",
                  f"| {name} | CIDEr-D | {r['cider']:.3f} | {r['n']} |"]
    for name, r in report["commute"].items():
        lines.append(f"| commute/{name} | accuracy | {r['accuracy']:.3f} | {r['items']} |")
    if report.get("loss_groups"):
        for g in ("in_distribution", "unseen", "translation"):
            v = report["loss_groups"].get(g)
            lines.append(f"| loss group | {g} (nats/token) | {'—' if v is None else f'{v:.4f}'} | |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (("report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n"),
                       ("report.md", markdown(report))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)
        paths.append(out / name)
    return paths[0], paths[1]


# ---- the command line -------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """`python -m florenz_fast.eval`: the sets to evaluate (each optional; layouts in the module doc)."""

    ckpt: str  # florenz-fast checkpoint directory (config.json + safetensors)
    out: str  # directory for report.json and report.md
    tokenizers: str | None = None  # dir with encoder/ and decoder/ tokenizer.json (default: beside the checkpoint)
    preset: str | None = None  # fail unless the checkpoint is this preset
    multi30k: str | None = None  # Multi30K task 1 directory (translation en->de/fr)
    multi30k_task2: str | None = None  # Multi30K task 2 directory (captioning en/de; needs flickr30k_images)
    flickr30k_images: str | None = None
    mscoco_images: str | None = None
    commute: str | None = None  # CoMMuTE directory
    xm3600: str | None = None  # XM3600 captions.jsonl (needs xm3600_images)
    xm3600_images: str | None = None
    coco_karpathy: str | None = None  # dataset_coco.json (needs coco_images)
    coco_images: str | None = None
    loss_manifest: str | None = None  # JSONL manifest for the scaling-law loss groups
    xm3600_langs: str = "en,de,fr,es,ru,zh"
    prefix: bool = False  # caption with the language prefix (stripped)
    batch_size: int = 8
    continuous: bool = False  # continuous batching: batch_size images decode at once, a finished one's slot refilled
    limit: int = 0  # at most this many items per set (0: all)
    num_beams: int = 4
    max_new_tokens: int = 128
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str | None = None  # float32 | bfloat16 | float16 (default: the checkpoint's)

    def validate(self) -> "EvalConfig":
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of ('float32', 'bfloat16', 'float16'), got {self.dtype!r}")
        # a set without its images fails here, before the model loads (evaluate() checks again for library use)
        for name, images in (("multi30k-task2", "flickr30k-images"), ("xm3600", "xm3600-images"),
                             ("coco-karpathy", "coco-images")):
            if getattr(self, name.replace("-", "_")) and not getattr(self, images.replace("-", "_")):
                raise ValueError(f"--{name} needs --{images}")
        return self


def run_cli(cfg: EvalConfig) -> int:
    """Loading the checkpoint is set-up (its errors: exit 2); a failure while evaluating (an unreadable image, a
    malformed set file) is one `error:` line naming the file and exit 1 (cli.guarded); a missing file is 2."""
    from dataclasses import replace

    import torch

    from .generate import load_pipeline

    try:
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_pipeline(cfg.ckpt, tokenizers=cfg.tokenizers, preset=cfg.preset, device=device,
                             dtype=getattr(torch, cfg.dtype) if cfg.dtype else None)
        pipe.config = replace(pipe.config, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens).validate()
    except (ValueError, KeyError) as exc:
        raise cli.UsageError(cli.error_message(exc)) from exc
    report = evaluate(pipe, cfg)
    report["meta"] = {"ckpt": str(cfg.ckpt), "num_beams": cfg.num_beams, "max_new_tokens": cfg.max_new_tokens,
                      "prefix": cfg.prefix, "limit": cfg.limit}
    j, m = write_report(report, cfg.out)
    print(markdown(report))
    print(f"wrote {j} and {m}")
    return 0


def main(argv=None) -> int:
    return cli.main(EvalConfig, run_cli, argv, prog="python -m florenz_fast.eval", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
