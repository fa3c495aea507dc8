"""The pipeline that turns records into encoded examples (SPEC §8, §6, §2): the seeded epoch order, the greedy
task-language balancer and DataPipeline, exactly resumable from a JSON-serialisable state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ..images import preprocess
from ..text import MAX_TEXT_LEN, TextTokenizer, encode_prompt, make_labels, prompt_for
from .readers import load_record_image
from .records import (
    CAPTION_TASKS,
    Annotation,
    BadData,
    DataStats,
    EncodedExample,
    Record,
    add_caption_prefix,
    check_annotation,
)

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


# --------------------------------------------------------------------------------------------- pipeline

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

    Every example carries its record's `image_id` (a hash of the record name, and of the bytes for an
    in-memory image; stable across runs), so a batch can run each distinct image through the frozen image
    path once. `group_size` k > 1 (the grouping sampler, default off): each visit draws min(k, annotations)
    distinct annotations of the image, one balancer draw each, and yields them one after another, so the
    loader packs them into one batch and the image runs through the tower once for all of them. What that
    does to the data is in docs/image-features.md: an epoch yields sum_i min(k, n_i) examples instead of one
    per image, an image with many annotations weighs more, and a batch of B samples holds ~B / k images.
    `features` (a features.FeatureCache, set by the training set-up): examples of cached images carry their
    image tokens in `features` and no pixels (the image is not even decoded).
    """

    def __init__(self, records: Iterable[Record], enc_tok: TextTokenizer, dec_tok: TextTokenizer, image_size: int,
                 seed: int = 0, caption_prefix: bool = False, group_size: int = 1):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1 (annotations drawn per visit), got {group_size!r}")
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
        settings = f"{self.seed} {self.image_size} {self.caption_prefix}"
        h = hashlib.sha1(settings.encode() + (f" group {group_size}".encode() if group_size > 1 else b""))
        for rec in self.records:
            h.update(rec.name.encode("utf-8", "replace") + b"\0")
            for a in rec.annotations:
                h.update(f"{a.key}\0{a.target}\0{a.source}\0".encode("utf-8", "replace"))
        self.fingerprint = h.hexdigest()  # resuming on other data (or settings) is refused
        self.group_size = group_size
        self.image_ids = record_image_ids(self.records)
        self.features = None  # a features.FeatureCache: cached images are served as tokens, not decoded
        self._group: list[tuple[int, int]] = []  # the visit's remaining (record, annotation) draws (group_size > 1)
        self._group_image: tuple[int, Any] | None = None  # (record, its pixels or cached tokens) of that visit
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

    def load_image(self, idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(pixels, None) of record `idx`, or (None, image tokens) when the feature cache holds it; raises what
        the decoder raises for a bad image."""
        if self.features is not None:
            tokens = self.features.get(self.image_ids[idx])
            if tokens is not None:
                return None, tokens
        return preprocess([load_record_image(self.records[idx].image)], self.image_size)[0], None

    def _example(self, idx: int, ann_idx: int, image: tuple[torch.Tensor | None, torch.Tensor | None]):
        rec, ann = self.records[idx], self.records[idx].annotations[ann_idx]
        prompt_ids, labels = self.encode(ann, rec.name)
        self.stats.use(ann.key)
        return EncodedExample(pixels=image[0], prompt_ids=prompt_ids, labels=labels, key=ann.key,
                              image_id=self.image_ids[idx], features=image[1])

    def _draw_group(self, idx: int) -> list[int]:
        """Annotation indices of one visit: one balancer draw, or (grouping) min(k, n) distinct ones in a row."""
        anns = self.records[idx].annotations
        left = list(range(len(anns)))
        chosen = []
        for _ in range(min(self.group_size, len(anns))):
            pick = left.pop(self.balancer.choose([anns[j].key for j in left]))
            chosen.append(pick)
        return chosen

    def _next(self) -> EncodedExample:
        if self._group:  # the rest of a grouped visit: the same image
            idx, ann_idx = self._group.pop(0)
            if self._group_image is None or self._group_image[0] != idx:  # resumed mid-group: load it again
                self._group_image = (idx, self.load_image(idx))
            return self._example(idx, ann_idx, self._group_image[1])
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
                    image = self.load_image(idx)
                except FileNotFoundError as e:
                    self.bad.add(idx)
                    self.stats.skip("missing_image", rec.name, str(e))
                except Exception as e:  # noqa: BLE001 - any decoder failure (PIL raises many types) is bad data
                    self.bad.add(idx)
                    self.stats.skip("corrupt_image", rec.name, f"{type(e).__name__}: {e}")
                else:
                    first, *rest = self._draw_group(idx)
                    self._group = [(idx, j) for j in rest]
                    self._group_image = (idx, image) if rest else None
                    return self._example(idx, first, image)
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
                "balancer": self.balancer.state_dict(), "stats": self.stats.as_dict(),
                **({"group": [list(g) for g in self._group]} if self._group else {})}

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
        self._group = [(int(i), int(j)) for i, j in state.get("group", [])]
        self._group_image = None


def record_image_ids(records: Sequence[Record]) -> list[str]:
    """One id per record's image, stable across runs and processes: sha1 of the record name (a manifest's
    normalised path, a tar shard:member, synthetic:seed:index) and, for an in-memory image (bytes), of its
    bytes. Two records with the same id (hand-built records sharing a name) get their list index mixed in, so
    distinct images never share an id; the same image under two names gets two ids (no dedup, still correct)."""
    ids = []
    for rec in records:
        h = hashlib.sha1(rec.name.encode("utf-8", "replace") + b"\0")
        if isinstance(rec.image, (bytes, bytearray)):
            h.update(hashlib.sha1(rec.image).digest())
        ids.append(h.hexdigest()[:24])
    seen: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        seen[image_id] = seen.get(image_id, 0) + 1
    return [hashlib.sha1(f"{image_id}#{i}".encode()).hexdigest()[:24] if seen[image_id] > 1 else image_id
            for i, image_id in enumerate(ids)]
