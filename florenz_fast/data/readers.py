"""Readers: records from a JSONL manifest or WebDataset-style tar shards, and the decoding of a record's image.

A reader yields Records (images left encoded or as paths; the pipeline decodes them when it visits them) and
counts what it skipped in a DataStats, returned as `.stats` of a RecordList (read at once) or a RecordStream
(streamed). Malformed input is skipped and counted by reason with its location (file:line, shard:member), never
raised mid-read; only a set-up error (a missing manifest) raises.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..images import load_image, to_rgb
from .records import Annotation, BadData, DataStats, Record, RecordList, RecordStream, make_annotation

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


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


# ----------------------------------------------------------------------------------------------- images

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
