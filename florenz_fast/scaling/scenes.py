"""Scenes of the pretrained pipeline (issue 18): records drawn fresh from the seeded scene generator, written as
a manifest train reads, the stage-B language-model text, and the image-grounding score (a per-language lexicon
of colour and shape words checked against the scene's ground truth).

The scenes, their rendering and their grammar are `data.synthetic`'s (sample_scene, render_scene,
describe_scene); this module only decides which annotations a stage sees and scores what a model writes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from ..data import Annotation, Record
from ..data.synthetic import (
    _DE_ADJ,
    _EN_ADJ,
    _ES_ADJ,
    _FR_ADJ,
    _NOUNS,
    COLOURS,
    SHAPES,
    SYNTHETIC_LANGS,
    Scene,
    describe_scene,
    render_scene,
    synthetic_scene,
)


def scene_annotations(scene: Scene, caption_langs: Sequence[str], translate_langs: Sequence[str] = (),
                      detailed: bool = True) -> list[Annotation]:
    """Captions (and detailed captions) in `caption_langs`; translations between English and each of
    `translate_langs` in both directions (x -> en is a translation into English), short and detailed."""
    variants = (False, True) if detailed else (False,)
    anns = []
    for det in variants:
        task = "detailed_caption" if det else "caption"
        anns += [Annotation(task, lang, describe_scene(scene, lang, det)) for lang in caption_langs]
    for det in variants:
        en = describe_scene(scene, "en", det)
        for lang in translate_langs:
            if lang == "en":
                continue
            other = describe_scene(scene, lang, det)
            anns += [Annotation("translate", lang, other, source=en), Annotation("translate", "en", en, source=other)]
    return anns


def write_scene_manifest(out: Path, n_images: int, seed: int, image_size: int, caption_langs: Sequence[str],
                         translate_langs: Sequence[str] = (), detailed: bool = True, max_groups: int = 0) -> Path:
    """`n_images` scenes (seed, index 0, 1, ...), each rendered once to out/img/NNNNNN.png, with their annotations
    in out/manifest.jsonl (train's data.source=manifest); written once (a finished manifest is reused, an
    interrupted one redone). `max_groups` > 0 keeps only scenes of at most that many groups (the generator's
    scenes in order, the others skipped). Returns the manifest path."""
    out = Path(out)
    manifest = out / "manifest.jsonl"
    if manifest.is_file():
        return manifest
    (out / "img").mkdir(parents=True, exist_ok=True)
    lines, index = [], 0
    for i in range(n_images):
        while True:
            scene, rng = synthetic_scene(seed, index)
            index += 1
            if max_groups <= 0 or len(scene.groups) <= max_groups:
                break
        rel = f"img/{i:06d}.png"
        render_scene(scene, image_size, rng).save(out / rel, format="PNG", compress_level=1)
        for a in scene_annotations(scene, caption_langs, translate_langs, detailed):
            row = {"image": rel, "task": a.task, "lang": a.lang, "target": a.target}
            if a.source is not None:
                row["source"] = a.source
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(manifest)
    return manifest


def heldout_scenes(out: Path, n_images: int, seed: int, image_size: int) -> tuple[list[Record], list[Scene]]:
    """Held-out records (images written to out/NNNN.png) captioned in every language, with translations between
    English and every other language, and their scenes (the grounding truth)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, scenes = [], []
    for i in range(n_images):
        scene, rng = synthetic_scene(seed, i)
        path = out / f"{i:04d}.png"
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp.png")
            render_scene(scene, image_size, rng).save(tmp, format="PNG")
            tmp.replace(path)
        records.append(Record(image=path, annotations=scene_annotations(scene, SYNTHETIC_LANGS, SYNTHETIC_LANGS,
                                                                        detailed=False), name=f"heldout:{i}"))
        scenes.append(scene)
    return records, scenes


# ---- stage B text ----------------------------------------------------------------------------------------------


def lm_texts(rng: random.Random, n: int, langs: Sequence[str] = SYNTHETIC_LANGS, parallel: float = 0.5) -> list[str]:
    """`n` language-model documents over fresh scenes: a caption or detailed caption in one language, or (with
    probability `parallel`) a parallel pair, the same scene described in two languages one after the other."""
    from ..data.synthetic import sample_scene

    texts = []
    for _ in range(n):
        scene = sample_scene(rng)
        det = rng.random() < 0.5
        if rng.random() < parallel:
            a, b = rng.sample(list(langs), 2)
            texts.append(f"{describe_scene(scene, a, det)} {describe_scene(scene, b, det)}")
        else:
            texts.append(describe_scene(scene, rng.choice(list(langs)), det))
    return texts


# ---- grounding ---------------------------------------------------------------------------------------------------


def _lexicon(lang: str) -> dict[str, tuple[str, str]]:
    """word (lower case) -> ("colour" | "shape", canonical value) for the shapes' words of one language."""
    words: dict[str, tuple[str, str]] = {}
    for shape, (sg, pl, _) in _NOUNS[lang].items():
        words[sg.lower()], words[pl.lower()] = ("shape", shape), ("shape", shape)
    for colour in COLOURS:
        if lang == "en":
            forms = [_EN_ADJ[colour]]
        elif lang == "de":
            forms = [_DE_ADJ[colour] + e for e in ("", "e", "er", "es", "en", "em")]
        else:
            forms = list((_FR_ADJ if lang == "fr" else _ES_ADJ)[colour])
        for f in forms:
            words[f.lower()] = ("colour", colour)
    return words


LEXICON = {lang: _lexicon(lang) for lang in SYNTHETIC_LANGS}


def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def mentions(text: str, lang: str) -> list[tuple[str, str]]:
    """The (kind, value) attributes a caption names in `lang`'s words (a caption in another language names
    none of them, except words the two languages share)."""
    if lang not in LEXICON:
        raise ValueError(f"grounding: no lexicon for {lang!r} (has {', '.join(LEXICON)})")
    return [LEXICON[lang][w] for w in _words(text) if w in LEXICON[lang]]


def scene_truth(scene: Scene) -> set[tuple[str, str]]:
    return {("colour", g.colour) for g in scene.groups} | {("shape", g.shape) for g in scene.groups}


def grounding(texts: Sequence[str], scenes: Sequence[Scene], lang: str) -> dict:
    """Accuracy of the colours and shapes the captions name against their scenes (mentions pooled over captions;
    0 when nothing is named), and the same captions scored against the next image's scene (`chance`: what a
    caption that ignores its image gets on this set)."""
    if len(texts) != len(scenes) or len(texts) < 2:
        raise ValueError(f"grounding: need >= 2 captions, one per scene; got {len(texts)} and {len(scenes)}")

    def score(pairs) -> tuple[int, int]:
        right = total = 0
        for text, scene in pairs:
            truth = scene_truth(scene)
            m = mentions(text, lang)
            right += sum(a in truth for a in m)
            total += len(m)
        return right, total

    right, total = score(zip(texts, scenes))
    c_right, c_total = score(zip(texts, list(scenes[1:]) + [scenes[0]]))
    return {"accuracy": right / total if total else 0.0, "chance": c_right / c_total if c_total else 0.0,
            "mentions_per_caption": total / len(texts)}


__all__ = ["LEXICON", "grounding", "heldout_scenes", "lm_texts", "mentions", "scene_annotations", "scene_truth",
           "write_scene_manifest", "SHAPES"]
