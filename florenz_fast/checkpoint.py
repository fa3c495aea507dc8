"""Model-agnostic checkpoint I/O: safetensors shards + a Hugging Face style JSON index.

Public API
    save_state_dict(state_dict, out_dir, *, max_shard_bytes, metadata, filename_prefix, require_finite,
                    extra_files) -> list[Path]
    open_checkpoint(path) -> Checkpoint      lazy, read-only, mmap-backed mapping key -> tensor
    load_into(target, source, *, dtype, device, strict, rename) -> LoadResult
    CheckpointError(ValueError)              every unreadable / inconsistent checkpoint
    CheckpointWriteError(OSError)            a write that failed (ENOSPC, EACCES, ...), naming the file

On-disk layout (identical to what transformers writes, so either side can read the other):
    one shard   <prefix>.safetensors
    several     <prefix>-00001-of-0000N.safetensors + <prefix>.safetensors.index.json
                index = {"metadata": {"total_size": bytes, "florenz_fast.tied": {...}, **user}, "weight_map": {...}}
Every shard header carries {"format": "pt"} (transformers refuses headers without it), the user metadata and,
when tensors were tied, "florenz_fast.tied": JSON {alias: kept_key}; the index repeats the ties so that either
source alone restores them. The engine's own metadata keys live under "florenz_fast."; other keys belong to
whoever wrote the file and are only passed through (`Checkpoint.metadata`). Files written before the namespace
carry a bare "tied" key: it is read as ties only where the header also says writer "florenz-fast..." (what
every writer of this engine stamped), so another tool's "tied", of any form, is never mistaken for ours.

Nothing here unpickles (DESIGN.md rule 11): tensors go through safetensors, metadata through JSON.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

__all__ = ["CheckpointError", "CheckpointWriteError", "Checkpoint", "LoadResult", "save_state_dict",
           "open_checkpoint", "load_into"]

SINGLE_NAME = "{prefix}.safetensors"
SHARD_NAME = "{prefix}-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "{prefix}.safetensors.index.json"
TIED_KEY = "florenz_fast.tied"  # namespaced: a bare "tied" is a common word other writers use in their own sense
_LEGACY_TIED_KEY = "tied"  # what this engine wrote before the namespace (see the module docstring)
_RESERVED_METADATA = ("format", TIED_KEY, _LEGACY_TIED_KEY, "total_size")
_MAX_LISTED = 20  # error messages list this many keys per category, then "... and N more"

# safetensors header dtype codes -> torch dtypes (getattr: the uint/float8 types depend on the torch build).
_DTYPES: dict[str, torch.dtype] = {
    code: dt
    for code, name in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
        "U64": "uint64", "U32": "uint32", "U16": "uint16",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
    }.items()
    if (dt := getattr(torch, name, None)) is not None
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, inconsistent, or does not fit the target it is loaded into."""


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (disk full, permissions, ...); the message names the file.
    Built as OSError(errno, message, path): `errno` and `filename` as usual, str() the message alone."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# --------------------------------------------------------------------------------------------------- save


def _tensor_identity(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Key under which two tensors are the *same* tensor (tied weights); None for tensors never tied.

    Empty and meta tensors have no real storage (data_ptr 0 for all of them), so they would all look tied.
    """
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving packing; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _write_shard(tensors: dict[str, torch.Tensor], path: Path, header: dict[str, str]) -> None:
    """Write one safetensors file and fsync it (a rename is only durable if the data reached the disk)."""
    save_file(tensors, str(path), metadata=header)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_text_synced(path: Path, text: str) -> None:
    """Write and fsync a small text file (the index, a caller's config.json)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _nonfinite_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding NaN or inf (one reduction per tensor, on its device)."""
    return [k for k, t in state_dict.items() if t.is_floating_point() and t.numel()
            and not bool(torch.isfinite(t.detach()).all())]


def _write_failed(exc: BaseException, target: Path, staged: Path, out: Path) -> CheckpointWriteError:
    # safetensors reports an I/O failure as its own SafetensorError, not OSError: keep its text, default errno
    code = getattr(exc, "errno", None) or errno.EIO
    reason = getattr(exc, "strerror", None) or str(exc)
    return CheckpointWriteError(code, f"writing {target} failed (staged as {staged}; {out} left as it was): {reason}",
                                str(target))


def _is_ours(name: str, prefix: str) -> bool:
    """Whether `name` is a checkpoint file this function would write for `prefix` (used to drop stale files)."""
    p = re.escape(prefix)
    return re.fullmatch(rf"{p}\.safetensors(\.index\.json)?|{p}-\d{{5}}-of-\d{{5}}\.safetensors", name) is not None


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 2**30,
    metadata: Mapping[str, str] | None = None,
    filename_prefix: str = "model",
    require_finite: bool = False,
    extra_files: Mapping[str, str] | None = None,
) -> list[Path]:
    """Save `state_dict` as safetensors shards in `out_dir`; return the written paths (index last).

    - Fits in `max_shard_bytes` -> `<prefix>.safetensors`; otherwise numbered shards plus
      `<prefix>.safetensors.index.json`.
    - Tied tensors (same storage, offset, shape, stride, dtype) are written once under the first key in sorted
      order; the other names are recorded as `{TIED_KEY: {alias: kept_key}}`; `open_checkpoint` serves them again.
      Other tensors that merely overlap a kept tensor's storage are written as independent copies.
    - Non-contiguous tensors are made contiguous; tensors on an accelerator reach CPU one shard at a time.
    - `metadata` (str -> str; `_RESERVED_METADATA` keys are not allowed) goes into every header and the index.
    - Atomic: everything is written into a hidden temporary sibling directory first. Only when all files are
      complete are they renamed into `out_dir` (the whole directory in one rename when `out_dir` does not exist
      yet; file by file, index last, otherwise), then stale `<prefix>` files of an older save are removed.
      An exception (e.g. TypeError for a non-tensor value) leaves `out_dir` untouched. A hard kill can at
      worst leave the hidden `.<out_dir>.*.tmp` sibling behind, never a partial file inside `out_dir`.
      A failed write (disk full, permissions) raises CheckpointWriteError naming the file; `out_dir` keeps
      its previous contents and the temporary directory is removed.
    - `require_finite`: refuse (ValueError naming the tensors, nothing written) when a floating-point tensor
      holds NaN or inf, so that a diverged model never replaces a good export.
    - `extra_files` (file name -> text, e.g. a config.json) are written into the same temporary directory and
      moved into `out_dir` with the shards, before the index: the files of one save are never mixed with
      those of an older one by a failure while writing.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    user_meta = dict(metadata or {})
    for k, v in user_meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must map str -> str (safetensors headers are text); "
                            f"got {k!r}: {type(v).__name__}")
        if k in _RESERVED_METADATA:
            raise ValueError(f"metadata key {k!r} is reserved (one of {_RESERVED_METADATA})")

    extra = dict(extra_files or {})
    for name, text in extra.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".") or _is_ours(name, filename_prefix) \
                or not isinstance(text, str):
            raise ValueError(f"extra_files: {name!r} must be a plain file name (not a {filename_prefix!r} "
                             f"checkpoint file) mapped to text")

    # Validate every value before anything touches the disk.
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        if value.device.type == "meta":
            raise ValueError(f"state_dict[{key!r}] is on the meta device and has no data to save")
        if value.layout != torch.strided:
            raise ValueError(f"state_dict[{key!r}] has layout {value.layout}; only dense tensors can be saved")
    if require_finite and (bad := _nonfinite_keys(state_dict)):
        n_float = sum(t.is_floating_point() for t in state_dict.values())
        listed = ", ".join(repr(k) for k in bad[:_MAX_LISTED]) + (f", ... and {len(bad) - _MAX_LISTED} more"
                                                                   if len(bad) > _MAX_LISTED else "")
        raise ValueError(f"not writing {out_dir}: {len(bad)} of {n_float} floating-point tensors hold NaN or inf "
                         f"({listed})")

    # Tied tensors: keep the first name in sorted order, remember the rest as aliases.
    tied: dict[str, str] = {}
    kept_by_identity: dict[tuple[Any, ...], str] = {}
    for key in sorted(state_dict):
        ident = _tensor_identity(state_dict[key])
        if ident is not None and ident in kept_by_identity:
            tied[key] = kept_by_identity[ident]
        elif ident is not None:
            kept_by_identity[ident] = key
    keys = [k for k in state_dict if k not in tied]  # insertion order keeps a layer's tensors together
    sizes = {k: state_dict[k].numel() * state_dict[k].element_size() for k in keys}
    shards = _plan_shards(sizes, max_shard_bytes)
    if len(shards) == 1:
        names = [SINGLE_NAME.format(prefix=filename_prefix)]
    else:
        names = [SHARD_NAME.format(prefix=filename_prefix, index=i + 1, count=len(shards)) for i in range(len(shards))]
    header = {"format": "pt", **user_meta, **({TIED_KEY: json.dumps(tied, sort_keys=True)} if tied else {})}

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, shard in tqdm(list(zip(names, shards)), desc="saving shards", unit="shard",
                                disable=None if len(shards) > 1 else True):
            tensors: dict[str, torch.Tensor] = {}
            seen_storage: set[tuple[torch.device, int]] = set()
            for key in shard:
                t = state_dict[key].detach()
                storage = (t.device, t.untyped_storage().data_ptr())
                # safetensors refuses overlapping tensors within one file; views that are not ties become copies.
                if t.numel() and storage in seen_storage:
                    t = t.clone()
                seen_storage.add(storage)
                tensors[key] = t.contiguous()
            try:
                _write_shard(tensors, tmp / name, header)
            except (OSError, SafetensorError) as e:  # safetensors' I/O errors are not OSError: name the file
                raise _write_failed(e, out / name, tmp / name, out) from e
            del tensors
        for name, text in extra.items():
            try:
                write_text_synced(tmp / name, text)
            except OSError as e:
                raise _write_failed(e, out / name, tmp / name, out) from e
        names[len(shards):len(shards)] = list(extra)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values()), **user_meta, **({TIED_KEY: tied} if tied else {})},
                "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
            }
            names.append(INDEX_NAME.format(prefix=filename_prefix))
            try:
                write_text_synced(tmp / names[-1], json.dumps(index, indent=2, sort_keys=True) + "\n")
            except OSError as e:
                raise _write_failed(e, out / names[-1], tmp / names[-1], out) from e

        # mkdtemp makes the directory 0o700; give it the permissions a normal mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in names:  # index last: it never points at a shard that is not in place yet
                os.replace(tmp / name, out / name)
            for stale in out.iterdir():
                if stale.name not in names and _is_ours(stale.name, filename_prefix):
                    stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]


# --------------------------------------------------------------------------------------------------- open


def _open_file(path: Path) -> Any:
    """safe_open a file (mmap, header only), turning every failure into a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for garbage/truncation, OSError for permissions, ...
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def _read_index(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Parse and validate an index json -> (weight_map, metadata)."""
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"malformed checkpoint index {path}: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    meta = index.get("metadata", {}) if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"malformed checkpoint index {path}: 'weight_map' must map str -> file name")
    if not isinstance(meta, dict):
        raise CheckpointError(f"malformed checkpoint index {path}: 'metadata' must be an object")
    return weight_map, meta


def _read_ties(meta: dict[str, Any], where: Path, *, encoded: bool) -> dict[str, str]:
    """Pop this engine's tie record off a header (`encoded`: a JSON string) or index metadata (an object).

    TIED_KEY is ours wherever it appears; the bare legacy key only in a file stamped by this engine's writers.
    A bare "tied" of another writer stays in `meta`, i.e. in Checkpoint.metadata, as that writer's own key.
    """
    if TIED_KEY in meta:
        key = TIED_KEY
    elif _LEGACY_TIED_KEY in meta and str(meta.get("writer", "")).startswith("florenz-fast"):
        key = _LEGACY_TIED_KEY
    else:
        return {}
    value = meta.pop(key)
    if encoded:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"malformed {key!r} metadata in {where}: {e}") from e
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(f"malformed {key!r} metadata in {where}: expected an object alias -> kept key, "
                              f"got {type(value).__name__}")
    return value


class Checkpoint(Mapping[str, torch.Tensor]):
    """Lazy read-only view of one or more safetensors files: key -> tensor, loaded on access.

    Opening reads only the headers; files are memory-mapped, so `ckpt[key]` touches just that tensor's
    pages and `shape(key)` / `dtype(key)` / `keys()` touch no tensor data at all. Returned tensors are CPU
    views of a private mapping shared by all reads of the same key: clone before mutating them.
    Tied aliases recorded at save time are served as ordinary keys.
    """

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, Path] | None,
                 index_meta: dict[str, Any] | None = None) -> None:
        self.path = path
        self.files = files
        self._handles = {f: _open_file(f) for f in files}
        file_keys = {f: set(h.keys()) for f, h in self._handles.items()}
        self._where: dict[str, Path] = {}
        self._aliases: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for f, h in self._handles.items():
            header = dict(h.metadata() or {})
            self._aliases.update(_read_ties(header, f, encoded=True))
            self.metadata.update({k: v for k, v in header.items() if k not in ("format", "total_size")})
            if weight_map is None:
                for key in file_keys[f]:
                    if key in self._where:
                        raise CheckpointError(f"key {key!r} is in both {self._where[key]} and {f} ({path})")
                    self._where[key] = f
        if index_meta is not None:
            index_meta = dict(index_meta)
            self._aliases.update(_read_ties(index_meta, path, encoded=False))
            self.metadata.update({k: v for k, v in index_meta.items() if k not in ("format", "total_size")})
        if weight_map is not None:
            for key, f in weight_map.items():
                if key not in file_keys[f]:
                    raise CheckpointError(f"index {path} maps {key!r} to {f}, which does not contain it")
            self._where = dict(weight_map)
        for alias, kept in self._aliases.items():
            if kept not in self._where or alias in self._where:
                raise CheckpointError(f"bad tied alias {alias!r} -> {kept!r} in {path}")

    def _locate(self, key: str) -> tuple[Any, str]:
        real = self._aliases.get(key, key)
        if real not in self._where:
            raise KeyError(key)
        return self._handles[self._where[real]], real

    def __getitem__(self, key: str) -> torch.Tensor:
        handle, real = self._locate(key)
        try:
            return handle.get_tensor(real)
        except Exception as e:
            raise CheckpointError(f"cannot read {real!r} from {self._where[real]}: {e}") from e

    def __contains__(self, key: object) -> bool:  # Mapping's default would load the tensor
        return key in self._where or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted([*self._where, *self._aliases]))

    def __len__(self) -> int:
        return len(self._where) + len(self._aliases)

    def shape(self, key: str) -> torch.Size:
        """Shape from the header; no tensor data is read."""
        handle, real = self._locate(key)
        return torch.Size(handle.get_slice(real).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """dtype from the header; no tensor data is read."""
        handle, real = self._locate(key)
        code = handle.get_slice(real).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"{real!r} in {self._where[real]} has dtype {code}, unsupported by this torch")
        return _DTYPES[code]

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors in {len(self.files)} file(s))"


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily. `path` may be a .safetensors file, an index json, or a directory.

    A directory is resolved in this order: `model.safetensors.index.json`, `model.safetensors`, the only
    `*.safetensors.index.json`, else every `*.safetensors` in it (HF-style shards without an index; a key
    present in two files is an error). Any failure raises CheckpointError naming the offending file.
    """
    p = Path(path)
    if p.is_dir():
        indexes = sorted(p.glob("*.safetensors.index.json"))
        if (p / "model.safetensors.index.json").is_file():
            p = p / "model.safetensors.index.json"
        elif (p / "model.safetensors").is_file():
            p = p / "model.safetensors"
        elif len(indexes) == 1:
            p = indexes[0]
        elif len(indexes) > 1:
            raise CheckpointError(f"{path} holds several indexes, pass one explicitly: {[i.name for i in indexes]}")
        else:
            files = sorted(f for f in p.glob("*.safetensors") if f.is_file())
            if not files:
                raise CheckpointError(f"no *.safetensors files in directory {p}")
            return Checkpoint(p, files, None)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if p.name.endswith(".json"):
        weight_map, meta = _read_index(p)
        by_name = {name: p.parent / name for name in sorted(set(weight_map.values()))}
        for name, f in by_name.items():
            if not f.is_file():
                raise CheckpointError(f"index {p} references missing shard {f}")
        return Checkpoint(p, list(by_name.values()), {k: by_name[v] for k, v in weight_map.items()}, meta)
    return Checkpoint(p, [p], None)


# --------------------------------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    """What a non-strict `load_into` skipped: target keys absent from the source, and source keys (before
    `rename`) that the target does not have. Both lists are sorted."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    more = [f"    ... and {len(items) - _MAX_LISTED} more"] if len(items) > _MAX_LISTED else []
    return [f"  {title} ({len(items)}):", *shown, *more]


def _shown(src_key: str, dst_key: str) -> str:
    """A key as it appears in error messages: the checkpoint name, plus its renamed target name if different."""
    return src_key if src_key == dst_key else f"{src_key} -> {dst_key}"


def _source_shape(source: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    shape = getattr(source, "shape", None)  # Checkpoint: header only; plain dicts: the tensor is in RAM anyway
    return torch.Size(shape(key)) if callable(shape) else source[key].shape


def load_into(
    target: torch.nn.Module | dict[str, torch.Tensor],
    source: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    rename: Callable[[str], str | None] | None = None,
) -> LoadResult:
    """Copy `source` tensors into a module's persistent parameters/buffers (or a state dict), one at a time.

    - `rename(src_key) -> dst_key`, or None to drop the key, maps checkpoint names onto target names.
    - Validation comes first and copies nothing on failure: all missing, unexpected and mis-shaped keys are
      gathered into one CheckpointError naming the checkpoint. With strict=False missing/unexpected keys are
      returned in a LoadResult instead (missing targets keep their values); wrong shapes always raise.
    - Each tensor is cast to the target's dtype, or to `dtype` when given (floating-point targets only: integer
      and bool buffers keep theirs), and lands on the target's device, or on `device` when given.
    - When the target tensor already has that dtype and device, the data is copied in place, so parameter
      identity (and anything holding it, e.g. an optimizer) is preserved. Otherwise — always for a module
      built on the meta device — the target is *replaced* by a new Parameter/buffer (like
      `load_state_dict(assign=True)`, but weights tied in the module stay tied: every name of one tensor gets
      the same replacement). Meta-device materialisation therefore needs no `to_empty()`; non-persistent
      buffers are not in any checkpoint and stay as the module made them.
    - Peak memory is the target plus one tensor: the source is memory-mapped and read key by key.
    """
    path = getattr(source, "path", None) or "<in-memory mapping>"
    owner = type(target).__name__
    expected = dict(target.state_dict(keep_vars=True)) if isinstance(target, torch.nn.Module) else dict(target)

    dst_to_src: dict[str, str] = {}
    for src_key in source.keys():
        dst_key = rename(src_key) if rename is not None else src_key
        if dst_key is None:
            continue
        if dst_key in dst_to_src:
            raise CheckpointError(f"{path}: {dst_to_src[dst_key]!r} and {src_key!r} both map to {dst_key!r}")
        dst_to_src[dst_key] = src_key

    missing = sorted(k for k in expected if k not in dst_to_src)
    unexpected = sorted(dst_to_src[k] for k in dst_to_src if k not in expected)
    misshaped = []
    for dst_key, src_key in sorted(dst_to_src.items()):
        if dst_key in expected:
            src_shape, dst_shape = _source_shape(source, src_key), expected[dst_key].shape
            if src_shape != dst_shape:
                misshaped.append(
                    f"{_shown(src_key, dst_key)}: checkpoint {tuple(src_shape)} vs {owner} {tuple(dst_shape)}"
                )
    if misshaped or (strict and (missing or unexpected)):
        renamed_unexpected = sorted(_shown(s, d) for d, s in dst_to_src.items() if d not in expected)
        lines = [f"cannot load checkpoint {path} into {owner}:",
                 *_listing("missing keys", missing), *_listing("unexpected keys", renamed_unexpected),
                 *_listing("mis-shaped keys", misshaped)]
        raise CheckpointError("\n".join(lines))

    replaced: dict[int, torch.Tensor] = {}  # id(old tensor) -> replacement, so tied names stay tied
    with torch.no_grad():
        for dst_key, old in expected.items():
            if dst_key not in dst_to_src:
                continue
            if id(old) in replaced:
                new = replaced[id(old)]
            else:
                want_dtype = dtype if dtype is not None and old.is_floating_point() else old.dtype
                want_device = torch.device(device) if device is not None else old.device
                if want_device.type == "meta":
                    want_device = torch.device("cpu")
                if want_device.type == "cuda" and want_device.index is None:  # "cuda" != "cuda:0" otherwise
                    want_device = torch.device("cuda", torch.cuda.current_device())
                src = source[dst_to_src[dst_key]]
                if old.device == want_device and old.dtype == want_dtype:
                    old.copy_(src)  # casts and moves as it copies; no extra tensor
                    replaced[id(old)] = old
                    continue
                # copy=True: a checkpoint tensor is a view of an mmap that later reads share; never alias it.
                new = src.to(device=want_device, dtype=want_dtype, copy=True)
                if isinstance(old, torch.nn.Parameter):
                    new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
                replaced[id(old)] = new
            if new is old:
                continue
            if isinstance(target, torch.nn.Module):
                mod_name, _, attr = dst_key.rpartition(".")
                mod = target.get_submodule(mod_name)
                (mod._parameters if attr in mod._parameters else mod._buffers)[attr] = new
            else:
                target[dst_key] = new
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)
