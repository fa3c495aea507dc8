"""The built-in synthetic multilingual set ("shapes") and the tokenizers trained on it offline.

Procedurally drawn images of 1-4 shapes (circle, square, triangle, star, diamond) in five colours, two sizes and
five positions on a white or grey background, described by a small grammar per language with its own word order
and agreement:
    en  "Two red circles on the left and a blue star on the right."                    adjective before noun
    de  "Links sind zwei rote Kreise und rechts ist ein blauer Stern."                 position first, verb second,
                                                                                       gender/number endings
    fr  "Deux cercles rouges à gauche et une étoile bleue à droite."                   colour after noun, size before
    es  "A la izquierda hay dos círculos rojos y a la derecha hay una estrella azul."  colour and size after noun
Captions exist for en and de only; fr and es get translations of the English captions but no captions, the way
the paper withholds captioning for some languages (SPEC §8), so captioning in fr/es can only emerge.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..text import LANGUAGES, TASKS, TextTokenizer, prompt_for, train_decoder_tokenizer, train_encoder_tokenizer
from .records import CAPTION_TASKS, Annotation, BadData, Record, add_caption_prefix, check_annotation

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
