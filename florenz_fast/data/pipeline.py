"""Training data (SPEC §8, §6, §2): records, the built-in synthetic multilingual set, manifest and tar readers,
the greedy task-language balancer and the pipeline that turns records into encoded examples.

    records = synthetic_records(512, seed=0, image_size=64)          # or read_manifest(...) / read_tar_shards(...)
    enc_tok, dec_tok = build_synthetic_tokenizers("runs/tok", records)
    pipeline = DataPipeline(records, enc_tok, dec_tok, image_size=64, seed=0)
    for ex in pipeline: ...                                           # EncodedExample, forever (epoch after epoch)
    state = pipeline.state_dict()                                     # JSON-serialisable; load_state_dict resumes

Vocabulary of this file:
    record      one image with all its annotations (SPEC §8: several annotations per image)
    annotation  (task, target language, target text, source text for translation); its key "task-lang"
                ("caption-de", "translate-fr") is what the balancer equalises and the metrics group by
    visit       the pipeline reaching a record in its shuffled epoch order; one annotation is drawn per visit

Bad data is never fatal mid-run: readers skip malformed rows/members at read time, the pipeline drops invalid
annotations when it is built and unreadable images when it first visits them (and never retries them), and
every skip is counted by reason with the first few names (file:line, shard:member, record name) in
`DataStats.report()`. Over-long texts are not skipped: they are truncated to 128 tokens (SPEC §6) and noted.

The synthetic set ("shapes"): procedurally drawn images of 1-4 shapes (circle, square, triangle, star, diamond)
in five colours, two sizes and five positions on a white or grey background, described by a small grammar
per language with its own word order and agreement:
    en  "Two red circles on the left and a blue star on the right."                    adjective before noun
    de  "Links sind zwei rote Kreise und rechts ist ein blauer Stern."                 position first, verb second,
                                                                                       gender/number endings
    fr  "Deux cercles rouges à gauche et une étoile bleue à droite."                   colour after noun, size before
    es  "A la izquierda hay dos círculos rojos y a la derecha hay una estrella azul."  colour and size after noun
Captions exist for en and de only; fr and es get translations of the English captions but no captions, the way
the paper withholds captioning for some languages (SPEC §8), so captioning in fr/es can only emerge.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from ..images import load_image, preprocess, to_rgb
from ..text import (
    CAPTION_PREFIXES,
    LANGUAGES,
    MAX_TEXT_LEN,
    TASKS,
    TextTokenizer,
    encode_prompt,
    make_labels,
    prompt_for,
    train_decoder_tokenizer,
    train_encoder_tokenizer,
)

log = logging.getLogger(__name__)

CAPTION_TASKS = ("caption", "detailed_caption", "more_detailed_caption")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


# ----------------------------------------------------------------------------------------------- records

@dataclass
class Annotation:
    task: str  # "caption" | "detailed_caption" | "more_detailed_caption" | "translate"
    lang: str  # target language code: en de fr es ru zh
    target: str  # target text
    source: str | None = None  # source text (translation; English)

    @property
    def key(self) -> str:
        """Balancing / metrics key, e.g. "caption-de", "translate-fr"."""
        return f"{self.task}-{self.lang}"


@dataclass
class Record:
    """One image with all its annotations. `image` is decoded only when the pipeline visits the record."""

    image: Any  # PIL.Image.Image | str | pathlib.Path | bytes (encoded file contents)
    annotations: list[Annotation]
    name: str = ""  # for error reports: file path, shard:member, synthetic:seed:index


@dataclass
class EncodedExample:
    pixels: torch.Tensor  # (3, S, S) float32, SPEC §2 preprocessing at the pipeline's image size
    prompt_ids: list[int]  # BART ids [<s>, ..., </s>], at most 128
    labels: list[int]  # Gemma ids [bos, t1..tn, eos], at most 128
    key: str  # annotation key, e.g. "caption-de"


class BadData(ValueError):
    """A row, member or annotation that cannot be used; `reason` is the DataStats counter it goes to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def make_annotation(task: Any, lang: Any, target: Any, source: Any = None) -> Annotation:
    """Validated, normalised Annotation from raw fields, or BadData with a reason.

    task: one of TASKS, case-insensitive, "<CAPTION>"-style tags and "translation" accepted;
    lang: one of LANGUAGES ("de", "DE", "<LANG_DE>", "lang_de"); target: non-empty text (stripped);
    source: non-empty text for "translate", ignored (None) for the captioning tasks.
    Reasons: unknown_task, unknown_lang, empty_target, missing_source, bad_field.
    """
    if not isinstance(task, str):
        raise BadData("unknown_task" if task is None else "bad_field", f"task must be a string, got {task!r}")
    t = task.strip().strip("<>").lower()
    t = "translate" if t == "translation" else t
    if t not in TASKS:
        raise BadData("unknown_task", f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if not isinstance(lang, str):
        raise BadData("unknown_lang" if lang is None else "bad_field", f"lang must be a string, got {lang!r}")
    code = lang.strip().strip("<>").lower()
    code = code[5:] if code.startswith("lang_") else code
    if code not in LANGUAGES:
        raise BadData("unknown_lang", f"unknown language tag {lang!r} (known: {', '.join(LANGUAGES)})")
    if target is not None and not isinstance(target, str):
        raise BadData("bad_field", f"target must be a string, got {type(target).__name__}")
    if target is None or not target.strip():
        raise BadData("empty_target", f"empty target text {target!r}")
    src = None
    if t == "translate":
        if source is not None and not isinstance(source, str):
            raise BadData("bad_field", f"source must be a string, got {type(source).__name__}")
        if source is None or not source.strip():
            raise BadData("missing_source", f"translation without a source text ({source!r})")
        src = source.strip()
    return Annotation(task=t, lang=code, target=target.strip(), source=src)


def check_annotation(ann: Annotation) -> Annotation:
    """`make_annotation` applied to an existing Annotation (BadData if it is unusable)."""
    if not isinstance(ann, Annotation):
        raise BadData("bad_field", f"not an Annotation: {type(ann).__name__}")
    return make_annotation(ann.task, ann.lang, ann.target, ann.source)


def add_caption_prefix(text: str, lang: str) -> str:
    """SPEC §6 decoder prefix: "A red circle." -> "The image shows a red circle." (text.strip_prefix undoes it).

    The caption's first letter is lower-cased when it starts an ordinary word (not an acronym; in German only
    for function words, since German nouns keep their capital); Chinese takes no space after the prefix.
    """
    prefix = CAPTION_PREFIXES[lang]
    body = text.strip()
    first = body.split(" ", 1)[0]
    if first[:1].isupper() and not first[1:2].isupper():
        if lang != "de" or first.lower().strip(",.") in _DE_FUNCTION_WORDS:
            body = body[0].lower() + body[1:]
    return f"{prefix}{body}" if lang == "zh" else f"{prefix} {body}"


_DE_FUNCTION_WORDS = {"ein", "eine", "einen", "zwei", "drei", "vier", "fünf", "der", "die", "das", "links",
                      "rechts", "oben", "unten", "in", "im", "auf", "an", "am", "es", "mehrere", "viele", "hier"}


# ------------------------------------------------------------------------------------------------- stats

class DataStats:
    """Counters of what the data produced: examples used per key, skips and notes per reason, with names.

    skip(reason, name, detail): an item that was dropped (missing_image, corrupt_image, bad_json, ...)
    note(what, name):           an item used with a caveat (truncated_prompt, truncated_target)
    use(key):                   an example yielded for a task-language key
    The first MAX_NAMES names per reason are kept for the report.
    """

    MAX_NAMES = 5

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.names: dict[str, list[str]] = {}

    def _name(self, reason: str, name: str, detail: str) -> None:
        names = self.names.setdefault(reason, [])
        if len(names) < self.MAX_NAMES:
            names.append(f"{name} ({detail})" if detail else name)

    def skip(self, reason: str, name: str = "", detail: str = "") -> None:
        self.skipped[reason] += 1
        self._name(reason, name or "?", detail)

    def note(self, what: str, name: str = "", detail: str = "") -> None:
        self.notes[what] += 1
        self._name(what, name or "?", detail)

    def use(self, key: str, n: int = 1) -> None:
        self.used[key] += n

    @property
    def n_used(self) -> int:
        return sum(self.used.values())

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataStats") -> "DataStats":
        self.used.update(other.used)
        self.skipped.update(other.skipped)
        self.notes.update(other.notes)
        for reason, names in other.names.items():
            for n in names:
                if len(self.names.setdefault(reason, [])) < self.MAX_NAMES:
                    self.names[reason].append(n)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"used": dict(sorted(self.used.items())), "skipped": dict(sorted(self.skipped.items())),
                "notes": dict(sorted(self.notes.items())),
                "names": {k: list(v) for k, v in sorted(self.names.items())}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> "DataStats":
        out = cls()
        out.used.update({k: int(v) for k, v in state.get("used", {}).items()})
        out.skipped.update({k: int(v) for k, v in state.get("skipped", {}).items()})
        out.notes.update({k: int(v) for k, v in state.get("notes", {}).items()})
        out.names = {k: [str(n) for n in v] for k, v in state.get("names", {}).items()}
        return out

    def report(self) -> str:
        """A few lines: examples used per key, skips per reason with names, notes."""
        lines = []
        used = ", ".join(f"{k} {v}" for k, v in sorted(self.used.items())) or "none"
        lines.append(f"data: {self.n_used} examples used ({used})")
        if self.skipped:
            lines.append(f"data: {self.n_skipped} skipped: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        else:
            lines.append("data: nothing skipped")
        for counter, verb in ((self.skipped, "skipped"), (self.notes, "noted")):
            for reason, n in sorted(counter.items()):
                names = self.names.get(reason, [])
                more = f", ... {n - len(names)} more" if n > len(names) else ""
                lines.append(f"  {reason} ({verb} {n}): " + "; ".join(names) + more)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DataStats(used={self.n_used}, skipped={dict(self.skipped)}, notes={dict(self.notes)})"


class RecordList(list):
    """A list of Records that also carries the DataStats of reading them (`.stats`)."""

    stats: DataStats


class RecordStream:
    """An iterator of Records that carries the DataStats of reading them (`.stats`, final once exhausted)."""

    def __init__(self, it: Iterator[Record], stats: DataStats):
        self._it, self.stats = it, stats

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> Record:
        return next(self._it)


# ------------------------------------------------------------------------------------------ seeded random

_M64 = (1 << 64) - 1


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each), stable across processes and platforms."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        h = z ^ (z >> 31)
    return h >> 1


_SALT_ORDER, _SALT_BALANCE = 0x0D7E, 0xBA1A


# --------------------------------------------------------------------------------------------- balancer

class GreedyBalancer:
    """SPEC §8: per visit draw one of the image's annotations, greedily toward uniform shares over keys.

    The target is uniform over all keys declared at construction or seen so far (K keys, N draws so far):
    a candidate whose key has count < N / K gets weight 1, any other 1e-6, and one candidate is sampled in
    proportion (so several annotations of an under-share key are equally likely, and when every candidate
    is at or over its share they are drawn uniformly). Draw d uses a torch.Generator seeded from (seed, d),
    so the state is just the counts and the number of draws: plain, JSON-serialisable, exactly resumable.
    """

    UNDER, OVER = 1.0, 1e-6

    def __init__(self, keys: Iterable[str] = (), seed: int = 0):
        self.seed = int(seed)
        self.counts: dict[str, int] = {k: 0 for k in keys}
        self.total = 0
        self.draws = 0
        self._gen = torch.Generator()

    @property
    def keys(self) -> list[str]:
        return list(self.counts)

    def weights(self, keys: Sequence[str]) -> list[float]:
        """Weights of candidates with these keys (keys not yet known count 0 and join the target)."""
        k = len(self.counts.keys() | set(keys))
        return [self.UNDER if self.counts.get(key, 0) * k < self.total else self.OVER for key in keys]

    def choose(self, keys: Sequence[str], generator: torch.Generator | None = None) -> int:
        """Index of the chosen candidate among `keys` (one key per annotation); its key's count goes up."""
        if not keys:
            raise ValueError("GreedyBalancer.choose: no candidates")
        for key in keys:
            self.counts.setdefault(key, 0)
        if len(keys) == 1:
            idx = 0
        else:
            w = torch.tensor(self.weights(keys), dtype=torch.float64)
            g = generator if generator is not None else self._gen.manual_seed(_mix(self.seed, self.draws))
            idx = int(torch.multinomial(w, 1, generator=g))
        self.draws += 1
        self.counts[keys[idx]] += 1
        self.total += 1
        return idx

    def shares(self) -> dict[str, float]:
        return {k: c / self.total if self.total else 0.0 for k, c in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self.draws, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}
        self.total = sum(self.counts.values())


# ---------------------------------------------------------------------------------- synthetic: scenes

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = ("red", "blue", "green", "yellow", "black")
SIZES = ("small", "large")
REGIONS = ("left", "right", "top", "bottom", "middle")
BACKGROUNDS = ("white", "grey")
SYNTHETIC_LANGS = ("en", "de", "fr", "es")


@dataclass(frozen=True)
class ShapeGroup:
    """`count` shapes of one kind, colour and size in one region of the image."""

    shape: str
    colour: str
    count: int
    region: str
    size: str = "large"


@dataclass(frozen=True)
class Scene:
    groups: tuple[ShapeGroup, ...]  # 1 or 2 groups, 1-4 shapes in all, described in this order
    background: str = "white"

    @property
    def n_shapes(self) -> int:
        return sum(g.count for g in self.groups)


def sample_scene(rng: random.Random) -> Scene:
    """One random scene: one group in any region (1-4 shapes) or two in opposite halves (2-4 shapes)."""
    background = rng.choice(BACKGROUNDS)
    if rng.random() < 0.5:
        regions, counts = [rng.choice(REGIONS)], [rng.randint(1, 4)]
    else:
        regions = list(rng.choice((("left", "right"), ("top", "bottom"))))
        if rng.random() < 0.5:
            regions.reverse()
        c1 = rng.randint(1, 3)
        counts = [c1, rng.randint(1, 4 - c1)]
    groups: list[ShapeGroup] = []
    for region, count in zip(regions, counts):
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
            if all((g.shape, g.colour) != (shape, colour) for g in groups):
                break
        groups.append(ShapeGroup(shape, colour, count, region, rng.choice(SIZES)))
    return Scene(tuple(groups), background)


# ------------------------------------------------------------------------------- synthetic: grammar

# noun: (singular, plural, gender); gender is None in English.
_NOUNS = {
    "en": {"circle": ("circle", "circles", None), "square": ("square", "squares", None),
           "triangle": ("triangle", "triangles", None), "star": ("star", "stars", None),
           "diamond": ("diamond", "diamonds", None)},
    "de": {"circle": ("Kreis", "Kreise", "m"), "square": ("Quadrat", "Quadrate", "n"),
           "triangle": ("Dreieck", "Dreiecke", "n"), "star": ("Stern", "Sterne", "m"),
           "diamond": ("Raute", "Rauten", "f")},
    "fr": {"circle": ("cercle", "cercles", "m"), "square": ("carré", "carrés", "m"),
           "triangle": ("triangle", "triangles", "m"), "star": ("étoile", "étoiles", "f"),
           "diamond": ("losange", "losanges", "m")},
    "es": {"circle": ("círculo", "círculos", "m"), "square": ("cuadrado", "cuadrados", "m"),
           "triangle": ("triángulo", "triángulos", "m"), "star": ("estrella", "estrellas", "f"),
           "diamond": ("rombo", "rombos", "m")},
}
# English adjectives do not inflect; German ones are stems taking endings; fr/es: (m sg, f sg, m pl, f pl).
_EN_ADJ = {**{c: c for c in COLOURS}, "small": "small", "large": "large"}
_DE_ADJ = {"red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb", "black": "schwarz",
           "small": "klein", "large": "groß"}
_FR_ADJ = {"red": ("rouge", "rouge", "rouges", "rouges"), "blue": ("bleu", "bleue", "bleus", "bleues"),
           "green": ("vert", "verte", "verts", "vertes"), "yellow": ("jaune", "jaune", "jaunes", "jaunes"),
           "black": ("noir", "noire", "noirs", "noires"), "small": ("petit", "petite", "petits", "petites"),
           "large": ("grand", "grande", "grands", "grandes")}
_ES_ADJ = {"red": ("rojo", "roja", "rojos", "rojas"), "blue": ("azul", "azul", "azules", "azules"),
           "green": ("verde", "verde", "verdes", "verdes"),
           "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
           "black": ("negro", "negra", "negros", "negras"), "small": ("pequeño", "pequeña", "pequeños", "pequeñas"),
           "large": ("grande", "grande", "grandes", "grandes")}
_NUMBERS = {"en": ("", "one", "two", "three", "four"), "de": ("", "ein", "zwei", "drei", "vier"),
            "fr": ("", "un", "deux", "trois", "quatre"), "es": ("", "un", "dos", "tres", "cuatro")}
_POSITIONS = {
    "en": {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "middle": "in the middle"},
    "de": {"left": "links", "right": "rechts", "top": "oben", "bottom": "unten", "middle": "in der Mitte"},
    "fr": {"left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas", "middle": "au centre"},
    "es": {"left": "a la izquierda", "right": "a la derecha", "top": "arriba", "bottom": "abajo",
           "middle": "en el centro"},
}
_BACKGROUND_WORDS = {"en": {"white": "white", "grey": "grey"}, "de": {"white": "weißen", "grey": "grauen"},
                     "fr": {"white": "blanc", "grey": "gris"}, "es": {"white": "blanco", "grey": "gris"}}
_CONJ = {"en": "and", "de": "und", "fr": "et", "es": "y"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _romance_form(forms: tuple[str, str, str, str], gender: str, plural: bool) -> str:
    return forms[(2 if plural else 0) + (1 if gender == "f" else 0)]


def noun_phrase(g: ShapeGroup, lang: str, with_size: bool = False) -> str:
    """"two large red circles", "zwei große rote Kreise", "deux grands cercles rouges", "dos círculos rojos grandes"."""
    sg, pl, gender = _NOUNS[lang][g.shape]
    plural = g.count > 1
    noun = pl if plural else sg
    if lang == "en":
        adjs = ([_EN_ADJ[g.size]] if with_size else []) + [_EN_ADJ[g.colour]]
        return " ".join(["a" if not plural else _NUMBERS["en"][g.count], *adjs, noun])
    if lang == "de":  # "ein" + mixed declension (nominative) in the singular, strong declension in the plural
        ending = "e" if plural else {"m": "er", "n": "es", "f": "e"}[gender]
        num = _NUMBERS["de"][g.count] + ("e" if not plural and gender == "f" else "")
        adjs = [_DE_ADJ[a] + ending for a in ([g.size] if with_size else []) + [g.colour]]
        return " ".join([num, *adjs, noun])
    num = _NUMBERS[lang][g.count] + ("e" if lang == "fr" and not plural and gender == "f" else "")
    num = "una" if lang == "es" and not plural and gender == "f" else num
    if lang == "fr":  # size adjectives (petit, grand) go before the noun, colours after
        pre = [_romance_form(_FR_ADJ[g.size], gender, plural)] if with_size else []
        return " ".join([num, *pre, noun, _romance_form(_FR_ADJ[g.colour], gender, plural)])
    if lang == "es":  # colour then size, both after the noun
        post = [_romance_form(_ES_ADJ[g.colour], gender, plural)]
        post += [_romance_form(_ES_ADJ[g.size], gender, plural)] if with_size else []
        return " ".join([num, noun, *post])
    raise ValueError(f"the synthetic grammar has no language {lang!r} (has {', '.join(SYNTHETIC_LANGS)})")


def _clause(g: ShapeGroup, lang: str, with_size: bool) -> str:
    np_, pos = noun_phrase(g, lang, with_size), _POSITIONS[lang][g.region]
    if lang == "en":
        return f"{pos} there {'are' if g.count > 1 else 'is'} {np_}" if with_size else f"{np_} {pos}"
    if lang == "de":  # position first, then the verb (verb-second), then the subject
        return f"{pos} {'sind' if g.count > 1 else 'ist'} {np_}"
    if lang == "fr":
        return f"{pos}, il y a {np_}" if with_size else f"{np_} {pos}"
    return f"{pos} hay {np_}"  # es


def describe_scene(scene: Scene, lang: str, detailed: bool = False) -> str:
    """The caption of `scene` in `lang` (en de fr es); `detailed` adds the background, the count and sizes."""
    if lang not in SYNTHETIC_LANGS:
        raise ValueError(f"the synthetic grammar has no language {lang!r} (has {', '.join(SYNTHETIC_LANGS)})")
    if not detailed:
        return _cap(f" {_CONJ[lang]} ".join(_clause(g, lang, False) for g in scene.groups)) + "."
    n, bg = scene.n_shapes, _BACKGROUND_WORDS[lang][scene.background]
    if lang == "en":
        head = (f"There is one shape on a {bg} background." if n == 1
                else f"There are {_NUMBERS['en'][n]} shapes on a {bg} background.")
    elif lang == "de":
        shapes = "ist eine Form" if n == 1 else f"sind {_NUMBERS['de'][n]} Formen"
        head = f"Auf einem {bg} Hintergrund {shapes} zu sehen."
    elif lang == "fr":
        head = f"Il y a {'une forme' if n == 1 else _NUMBERS['fr'][n] + ' formes'} sur un fond {bg}."
    else:
        head = f"Hay {'una forma' if n == 1 else _NUMBERS['es'][n] + ' formas'} sobre un fondo {bg}."
    body = [_cap(_clause(g, lang, True)) + "." for g in scene.groups]
    return " ".join([head, *body])


# ------------------------------------------------------------------------------ synthetic: rendering

_RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 160, 50), "yellow": (240, 200, 0),
        "black": (20, 20, 20), "white": (255, 255, 255), "grey": (190, 190, 190)}
_REGION_BOXES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
                 "bottom": (0.0, 0.5, 1.0, 1.0), "middle": (0.25, 0.25, 0.75, 0.75)}
_RADIUS = {"large": 0.12, "small": 0.07}  # of the image side; clipped to fit the slot


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _slots(region: str, count: int, rng: random.Random) -> list[tuple[float, float, float, float]]:
    """Cells (x0, y0, x1, y1) for `count` shapes: a column in left/right, a row in top/bottom, 2x2 in the middle."""
    x0, y0, x1, y1 = _REGION_BOXES[region]
    w, h = x1 - x0, y1 - y0
    if region == "middle" and count > 2:
        cells = [(x0 + i * w / 2, y0 + j * h / 2, x0 + (i + 1) * w / 2, y0 + (j + 1) * h / 2)
                 for j in range(2) for i in range(2)]
        return sorted(rng.sample(cells, count))
    if h > w:
        return [(x0, y0 + i * h / count, x1, y0 + (i + 1) * h / count) for i in range(count)]
    return [(x0 + i * w / count, y0, x0 + (i + 1) * w / count, y1) for i in range(count)]


def _shape_points(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2 + turn + k * 2 * math.pi / 3 for k in range(3))]
    if shape == "star":
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                for k in range(10)
                for rr, a in [((r if k % 2 == 0 else 0.45 * r), -math.pi / 2 + turn + k * math.pi / 5)]]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    raise ValueError(shape)


def render_scene(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """RGB image of `scene`, `size` px square, drawn at up to 4x and downsampled (anti-aliased edges).

    Placement inside each cell, a small rotation of triangles/stars and colour jitter come from `rng`.
    """
    ss = max(1, min(4, 512 // size))
    side = size * ss
    im = Image.new("RGB", (side, side), _jitter(_RGB[scene.background], rng, 8))
    draw = ImageDraw.Draw(im)
    for g in scene.groups:
        colour = _jitter(_RGB[g.colour], rng, 20)
        for x0, y0, x1, y1 in _slots(g.region, g.count, rng):
            r = min(_RADIUS[g.size], 0.45 * min(x1 - x0, y1 - y0))
            mx, my = max(0.0, (x1 - x0) / 2 - r - 0.01), max(0.0, (y1 - y0) / 2 - r - 0.01)
            cx = (x0 + x1) / 2 + rng.uniform(-mx, mx)
            cy = (y0 + y1) / 2 + rng.uniform(-my, my)
            turn = rng.uniform(-0.2, 0.2)
            cx, cy, rp = cx * side, cy * side, r * side
            if g.shape == "circle":
                draw.ellipse([cx - rp, cy - rp, cx + rp, cy + rp], fill=colour)
            elif g.shape == "square":
                h = 0.85 * rp
                draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
            else:
                draw.polygon(_shape_points(g.shape, cx, cy, rp, turn), fill=colour)
    return im if ss == 1 else im.reduce(ss)


def synthetic_scene(seed: int, index: int) -> tuple[Scene, random.Random]:
    """Scene `index` of the synthetic set with `seed`, and the rng (already advanced) that renders it."""
    rng = random.Random(f"florenz-fast synthetic shapes {seed} {index}")  # str seeds hash with SHA-512: stable
    return sample_scene(rng), rng


def synthetic_records(n_images: int, seed: int, image_size: int, langs: Sequence[str] = ("en", "de", "fr", "es"),
                      caption_langs: Sequence[str] = ("en", "de"), detailed: bool = True) -> list[Record]:
    """The built-in synthetic multilingual set: `n_images` records, deterministic in (seed, index).

    Per image (PNG bytes, `image_size` px): a short caption in each of `caption_langs` (task "caption") and,
    if `detailed`, a detailed caption ("detailed_caption") in each; translations of the English short (and
    detailed) caption into every other language of `langs` (task "translate", source = the English text).
    Languages in `langs` but not in `caption_langs` (fr, es by default) get translations but no captions.
    """
    langs, caption_langs = tuple(langs), tuple(caption_langs)
    for lang in langs:
        if lang not in SYNTHETIC_LANGS:
            raise ValueError(f"synthetic langs: no grammar for {lang!r} (has {', '.join(SYNTHETIC_LANGS)})")
    if "en" not in langs:
        raise ValueError("synthetic langs must include 'en' (the translation source)")
    if not set(caption_langs) <= set(langs):
        raise ValueError(f"caption_langs {caption_langs} must be a subset of langs {langs}")
    if n_images < 1 or image_size < 8:
        raise ValueError(f"need n_images >= 1 and image_size >= 8, got {n_images}, {image_size}")
    records = []
    for index in range(n_images):
        scene, rng = synthetic_scene(seed, index)
        buf = io.BytesIO()
        render_scene(scene, image_size, rng).save(buf, format="PNG", compress_level=1)
        anns: list[Annotation] = []
        variants = (False, True) if detailed else (False,)
        for det in variants:
            task = "detailed_caption" if det else "caption"
            anns += [Annotation(task, lang, describe_scene(scene, lang, det)) for lang in caption_langs]
        for det in variants:
            src = describe_scene(scene, "en", det)
            anns += [Annotation("translate", lang, describe_scene(scene, lang, det), source=src)
                     for lang in langs if lang != "en"]
        records.append(Record(image=buf.getvalue(), annotations=anns, name=f"synthetic:{seed}:{index}"))
    return records


# ------------------------------------------------------------------------------------------- tokenizers

def tokenizer_corpus(records: Iterable[Record], caption_prefix: bool = True) -> tuple[list[str], list[str]]:
    """(encoder texts, decoder texts) for training tokenizers on `records`.

    Encoder: the SPEC §6 prompt of every annotation plus every language x task prompt; decoder: every
    target, and with `caption_prefix` also the prefixed caption targets. Invalid annotations are left out.
    """
    enc = [prompt_for(task, lang) for lang in LANGUAGES for task in TASKS if task != "translate"]
    dec: list[str] = []
    for rec in records:
        for ann in rec.annotations:
            try:
                ann = check_annotation(ann)
            except BadData:
                continue
            enc.append(prompt_for(ann.task, ann.lang, ann.source))
            dec.append(ann.target)
            if caption_prefix and ann.task in CAPTION_TASKS:
                dec.append(add_caption_prefix(ann.target, ann.lang))
    return enc, dec


def build_synthetic_tokenizers(out_dir: str | Path, records: Iterable[Record],
                               vocab_size: int = 512) -> tuple[TextTokenizer, TextTokenizer]:
    """(encoder, decoder) tokenizers trained offline on the records' prompts and targets.

    Written to out_dir/encoder/tokenizer.json (BART-like byte-level BPE, <s>=0 <pad>=1 </s>=2) and
    out_dir/decoder/tokenizer.json (Gemma-like BPE with byte fallback, pad=0 eos=1 bos=2); at most
    `vocab_size` entries each (512 fits the `tiny` preset), deterministic for the same records, and every
    text round-trips (byte-level / byte fallback).
    """
    enc_texts, dec_texts = tokenizer_corpus(records)
    out_dir = Path(out_dir)
    enc = train_encoder_tokenizer(out_dir / "encoder", enc_texts, vocab_size)
    dec = train_decoder_tokenizer(out_dir / "decoder", dec_texts, vocab_size)
    return enc, dec


# ---------------------------------------------------------------------------------------------- readers

def read_manifest(path: str | Path, stats: DataStats | None = None) -> RecordList:
    """Records from a JSONL manifest, one annotation per row: {"image", "task", "lang", "source", "target"}.

    Rows sharing an image path are grouped into one Record (first-appearance order); relative image paths
    are read from the manifest's directory. Malformed rows (bad JSON or UTF-8, missing image field, unknown
    task or language tag, empty target, translation without source) are skipped and counted with their
    file:line in `stats` (a new DataStats if None), which the returned list carries as `.stats`. Images are
    not opened here: the pipeline reports missing or corrupt ones when it visits them.
    """
    path = Path(path)
    stats = DataStats() if stats is None else stats
    base = path.parent
    groups: dict[str, Record] = {}
    with open(path, "rb") as f:  # a missing manifest is a set-up error: FileNotFoundError
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                stats.skip("bad_encoding", where, str(e))
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                stats.skip("bad_json", where, str(e))
                continue
            if not isinstance(row, dict):
                stats.skip("bad_json", where, f"row is a {type(row).__name__}, not an object")
                continue
            image = row.get("image")
            if not isinstance(image, str) or not image.strip():
                stats.skip("missing_field", where, f"no image path ({image!r})")
                continue
            try:
                ann = make_annotation(row.get("task"), row.get("lang"), row.get("target"), row.get("source"))
            except BadData as e:
                stats.skip(e.reason, where, str(e))
                continue
            img = Path(image.strip())
            img = Path(os.path.normpath(img if img.is_absolute() else base / img))  # "./a.png" groups with "a.png"
            rec = groups.get(str(img))
            if rec is None:
                rec = groups[str(img)] = Record(image=img, annotations=[], name=str(img))
            rec.annotations.append(ann)
    out = RecordList(groups.values())
    out.stats = stats
    if stats.n_skipped:
        log.warning("read_manifest %s: %d rows skipped\n%s", path, stats.n_skipped, stats.report())
    return out


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, extension = the rest."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (ext.lower() if dot else "")


def _annotations_from_json(data: bytes, where: str, stats: DataStats) -> list[Annotation]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        stats.skip("bad_json", where, str(e))
        return []
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        obj = obj["annotations"]
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for i, item in enumerate(items):
        name = f"{where}#{i}" if len(items) > 1 else where
        if not isinstance(item, dict):
            stats.skip("bad_json", name, f"annotation is a {type(item).__name__}, not an object")
            continue
        try:
            out.append(make_annotation(item.get("task"), item.get("lang"), item.get("target"), item.get("source")))
        except BadData as e:
            stats.skip(e.reason, name, str(e))
    return out


def _iter_tar(paths: Sequence[Path], stats: DataStats) -> Iterator[Record]:
    def flush(shard: Path, key: str, parts: dict[str, bytes]) -> Record | None:
        where = f"{shard}:{key}"
        image_ext = next((e for e in parts if e in IMAGE_EXTENSIONS), None)
        if "json" not in parts:
            stats.skip("missing_json", where, f"members: {', '.join(sorted(parts)) or 'none'}")
            return None
        anns = _annotations_from_json(parts["json"], f"{where}.json", stats)
        if image_ext is None:
            stats.skip("missing_image", where, f"no image member ({', '.join(sorted(parts))})")
            return None
        if not anns:
            return None
        return Record(image=parts[image_ext], annotations=anns, name=f"{where}.{image_ext}")

    for shard in paths:
        if not shard.is_file():
            stats.skip("missing_shard", str(shard), "no such file")
            continue
        key, parts = None, {}
        try:
            with tarfile.open(shard, "r|*") as tf:  # streaming: members of a sample are adjacent in WebDataset
                for member in tf:
                    if not member.isfile():
                        continue
                    k, ext = _split_member(member.name)
                    if k != key:
                        if key is not None and (rec := flush(shard, key, parts)) is not None:
                            yield rec
                        key, parts = k, {}
                    f = tf.extractfile(member)
                    parts[ext] = f.read() if f is not None else b""
                # tarfile ends quietly when a file is cut at a header boundary; only the missing end-of-archive
                # (zero) block after the last member tells such a truncated shard from a whole one.
                with open(shard, "rb") as raw:
                    raw.seek(tf.offset)
                    if raw.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                        raise tarfile.ReadError("truncated archive (no end-of-archive block)")
            if key is not None and (rec := flush(shard, key, parts)) is not None:
                yield rec
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated or corrupt shard: what came before is kept, the sample in progress and the rest lost.
            stats.skip("bad_shard", f"{shard}" + (f" after {key}" if key else ""), str(e) or type(e).__name__)
    if stats.n_skipped:
        log.warning("read_tar_shards: %d items skipped\n%s", stats.n_skipped, stats.report())


def read_tar_shards(paths: str | Path | Sequence[str | Path], stats: DataStats | None = None) -> RecordStream:
    """Records from WebDataset-style tar shards, streamed shard by shard.

    Members are grouped by key (path up to the first dot of the basename): `<key>.jpg|png|...` holds the
    image, `<key>.json` the annotations (a list of {"task", "lang", "source", "target"}, one such object, or
    {"annotations": [...]}). Samples without json or image, bad JSON, invalid annotations, missing or
    truncated shards are skipped and counted in `stats` (`.stats` of the returned iterator). The image bytes
    are decoded when the pipeline visits the record. Pass the stream itself to DataPipeline (not a list made
    from it) to carry its skip counts into the pipeline's report.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    stats = DataStats() if stats is None else stats
    return RecordStream(_iter_tar([Path(p) for p in paths], stats), stats)


# --------------------------------------------------------------------------------------------- pipeline

def load_record_image(image: Any) -> Image.Image:
    """RGB PIL image of a Record's `image` (PIL image, path or encoded bytes); errors say why."""
    if isinstance(image, Image.Image):
        image.load()
        return to_rgb(image)
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(image))) as im:
            im.load()  # decode now: a truncated file fails here
            return to_rgb(im)
    raise TypeError(f"record image must be a PIL image, a path or bytes, got {type(image).__name__}")


class DataPipeline:
    """Records -> EncodedExample stream, forever, exactly resumable.

    Visits the records in a seeded shuffled order (a fresh permutation per epoch, from (seed, epoch)), draws
    one annotation per visit with the GreedyBalancer, builds the SPEC §6 prompt, tokenizes (128-token
    truncation, noted), preprocesses the image (SPEC §2, `image_size` px). With `caption_prefix` caption
    targets start with the language's prefix ("Das Bild zeigt ...").

    Bad data is skipped, counted in `.stats`, never fatal: invalid annotations (unknown task or language,
    empty target, translation without source) when the pipeline is built; missing or unreadable images
    (truncated JPEG, not an image) when first visited, after which the record is excluded for good. Only
    when a whole epoch yields nothing (every image bad) does iteration raise RuntimeError with the report.

    `records` may be any iterable (it is read once into a list; a reader's `.stats` is merged into
    `.stats`). Iterating always continues from the current position, so `state_dict()` taken between two
    examples and `load_state_dict()` on a fresh pipeline over the same records continue the same stream.
    """

    def __init__(self, records: Iterable[Record], enc_tok: TextTokenizer, dec_tok: TextTokenizer, image_size: int,
                 seed: int = 0, caption_prefix: bool = False):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        records_list = list(records)  # reads a stream to the end, so its stats are complete afterwards
        self.stats = DataStats()
        reader_stats = getattr(records, "stats", None)
        if isinstance(reader_stats, DataStats):
            self.stats.merge(reader_stats)
        self.enc_tok, self.dec_tok = enc_tok, dec_tok
        self.image_size, self.seed, self.caption_prefix = int(image_size), int(seed), bool(caption_prefix)
        self.records: list[Record] = []
        for i, rec in enumerate(records_list):
            name = rec.name or f"record {i}"
            if rec.image is None:
                self.stats.skip("missing_image", name, "no image")
                continue
            anns = []
            for j, ann in enumerate(rec.annotations):
                try:
                    anns.append(check_annotation(ann))
                except BadData as e:
                    self.stats.skip(e.reason, f"{name}#{j}", str(e))
            if not anns:
                self.stats.skip("no_annotations", name, "no usable annotation")
                continue
            self.records.append(Record(rec.image, anns, name))
        if not self.records:
            raise ValueError(f"DataPipeline: no usable records among {len(records_list)}\n{self.stats.report()}")
        keys = sorted({a.key for r in self.records for a in r.annotations})
        self.balancer = GreedyBalancer(keys, seed=_mix(self.seed, _SALT_BALANCE))
        h = hashlib.sha1(f"{self.seed} {self.image_size} {self.caption_prefix}".encode())
        for rec in self.records:
            h.update(rec.name.encode("utf-8", "replace") + b"\0")
            for a in rec.annotations:
                h.update(f"{a.key}\0{a.target}\0{a.source}\0".encode("utf-8", "replace"))
        self.fingerprint = h.hexdigest()  # resuming on other data (or settings) is refused
        self.epoch, self.pos = 0, 0
        self.bad: set[int] = set()
        self._order_epoch, self._order_cache = -1, []
        self._text_cache: dict[tuple[str, str], tuple[tuple[int, ...], bool]] = {}

    # ---- iteration --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, _SALT_ORDER, epoch))
            self._order_cache, self._order_epoch = torch.randperm(len(self.records), generator=g).tolist(), epoch
        return self._order_cache

    def _ids(self, side: str, text: str) -> tuple[list[int], bool]:
        """Token ids (prompt or labels) and whether they were cut to MAX_TEXT_LEN; cached per text."""
        hit = self._text_cache.get((side, text))
        if hit is None:
            tok, fn = (self.enc_tok, encode_prompt) if side == "prompt" else (self.dec_tok, make_labels)
            ids = fn(tok, text)
            cut = len(ids) == MAX_TEXT_LEN and len(tok.encode(text)) > MAX_TEXT_LEN - 2
            if len(self._text_cache) > 200_000:  # bounded: real data has few repeats
                self._text_cache.clear()
            hit = self._text_cache[(side, text)] = (tuple(ids), cut)
        return list(hit[0]), hit[1]

    def encode(self, ann: Annotation, name: str = "") -> tuple[list[int], list[int]]:
        """(prompt_ids, labels) of an annotation; truncations are noted in `.stats`."""
        target = ann.target
        if self.caption_prefix and ann.task in CAPTION_TASKS:
            target = add_caption_prefix(target, ann.lang)
        prompt_ids, cut_p = self._ids("prompt", prompt_for(ann.task, ann.lang, ann.source))
        labels, cut_l = self._ids("labels", target)
        if cut_p:
            self.stats.note("truncated_prompt", name, ann.key)
        if cut_l:
            self.stats.note("truncated_target", name, ann.key)
        return prompt_ids, labels

    def _next(self) -> EncodedExample:
        n = len(self.records)
        misses = 0
        while True:
            idx = self._order(self.epoch)[self.pos]
            self.pos += 1
            if self.pos == n:
                self.epoch, self.pos = self.epoch + 1, 0
            if idx not in self.bad:
                rec = self.records[idx]
                try:
                    pixels = preprocess([load_record_image(rec.image)], self.image_size)[0]
                except FileNotFoundError as e:
                    self.bad.add(idx)
                    self.stats.skip("missing_image", rec.name, str(e))
                except Exception as e:  # noqa: BLE001 - any decoder failure (PIL raises many types) is bad data
                    self.bad.add(idx)
                    self.stats.skip("corrupt_image", rec.name, f"{type(e).__name__}: {e}")
                else:
                    ann = rec.annotations[self.balancer.choose([a.key for a in rec.annotations])]
                    prompt_ids, labels = self.encode(ann, rec.name)
                    self.stats.use(ann.key)
                    return EncodedExample(pixels=pixels, prompt_ids=prompt_ids, labels=labels, key=ann.key)
            misses += 1
            if misses > n:
                raise RuntimeError(f"DataPipeline: a whole epoch without a usable record\n{self.stats.report()}")

    def __iter__(self) -> Iterator[EncodedExample]:
        while True:
            yield self._next()

    # ---- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Exact position (JSON-serialisable, a fresh copy): epoch, index in the epoch order, the records found
        bad, the balancer counts and draws (its RNG is counter-based), and the stats so far."""
        return {"version": 1, "fingerprint": self.fingerprint, "seed": self.seed, "epoch": self.epoch,
                "pos": self.pos, "num_records": len(self.records), "bad": sorted(self.bad),
                "balancer": self.balancer.state_dict(), "stats": self.stats.as_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; raises ValueError if it was taken on other records or settings."""
        if state.get("version") != 1:
            raise ValueError(f"unknown DataPipeline state version {state.get('version')!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("DataPipeline state was taken on different records, seed, image size or prefix "
                             f"setting ({state['num_records']} records, seed {state['seed']}; this pipeline: "
                             f"{len(self.records)} records, seed {self.seed})")
        pos, epoch = int(state["pos"]), int(state["epoch"])
        if not (0 <= pos < len(self.records)) or epoch < 0:
            raise ValueError(f"DataPipeline state has an invalid position epoch={epoch}, pos={pos}")
        self.epoch, self.pos = epoch, pos
        self.bad = {int(i) for i in state["bad"]}
        self.balancer.load_state_dict(state["balancer"])
        self.stats = DataStats.from_dict(state["stats"])  # replaces: the saved stats already hold the reader's
