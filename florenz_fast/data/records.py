"""Records and their bookkeeping (SPEC §8, §6): Annotation, Record, EncodedExample, the validation that turns raw
fields into an Annotation (or BadData with a reason), the SPEC §6 caption prefix, and DataStats, the counters of
what was used, skipped and noted. RecordList / RecordStream are what readers return: records plus the DataStats
of reading them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..text import CAPTION_PREFIXES, LANGUAGES, TASKS

CAPTION_TASKS = ("caption", "detailed_caption", "more_detailed_caption")


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
    pixels: torch.Tensor | None  # (3, S, S) float32, SPEC §2 preprocessing; None when `features` holds the tokens
    prompt_ids: list[int]  # BART ids [<s>, ..., </s>], at most 128
    labels: list[int]  # Gemma ids [bos, t1..tn, eos], at most 128
    key: str  # annotation key, e.g. "caption-de"
    # which image (stable across runs: the record name, see DataPipeline): collation runs each distinct image
    # of a batch through the frozen image path once (packing.image_inputs); None = every example its own image
    image_id: str | None = None
    features: torch.Tensor | None = None  # (N_img_tokens, d) image tokens from the feature cache (features.py)


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
