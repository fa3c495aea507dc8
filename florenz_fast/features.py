"""The on-disk feature cache: the frozen image path's output per image, for multi-epoch runs and sweeps.

    cache = FeatureCache.for_model(model, "runs/features", image_size=224)   # key: a hash of the image path
    cache.fill(model, pipeline)                     # once: every image of the pipeline not cached yet
    pipeline.features = cache                       # cached images: tokens instead of pixels, never decoded

What is stored: the image tokens (N_img, d) that Florenz.frozen_image_tokens gives (the projector's output, what
the encoder reads), not the DaViT map (C, H/32, W/32): the projector is frozen too, the tokens are smaller at
the paper's presets (d 1024 vs C 1024 / 2048 at 577 tokens: never larger) and nothing is left to run per step.

Layout: <directory>/<key>/features-<xx>.safetensors, `xx` the first two hex digits of sha1(image id) (256 shards,
so a shard stays small and a fill rewrites each shard once); tensor names are the image ids; the safetensors
metadata holds the format, the key, the token shape and dtype. <key> is a sha256 of the vision tower and
projector state dict (every name, dtype, shape and byte, computed once), the image size and the chunk size of
the frozen path (an image's bits depend on it): other weights, another preprocessing or chunking never meet
these tokens. Writes are atomic (a temporary file in the same directory, then os.replace). Reads check the
metadata (format, key), each tensor's shape and dtype, and that the file parses at all; a mismatch or a corrupt
file is a ValueError naming the file. Only tensors and JSON metadata: nothing is unpickled (DESIGN.md 11).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "florenz-fast/image-features-v1"
SHARD_DIGITS = 2
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def image_path_hash(model, image_size: int) -> str:
    """sha256 over the vision tower + projector state dict (names, dtypes, shapes, bytes), the image size and
    the frozen path's chunk size: the cache key."""
    h = hashlib.sha256(f"{FORMAT} image_size={image_size} chunk={model.frozen_image_chunk}\n".encode())
    for prefix, module in (("vision_tower.", model.vision_tower), ("projector.", model.projector)):
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{prefix}{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FeatureCache:
    """Image tokens keyed by image id, in safetensors shards under <directory>/<key> (see the module doc)."""

    def __init__(self, directory: str | Path, key: str, n_tokens: int, d: int, dtype: torch.dtype = torch.float32):
        self.root = Path(directory) / key
        self.key, self.shape, self.dtype = key, (int(n_tokens), int(d)), dtype
        self._shards: dict[str, set[str]] = {}  # shard name -> the image ids in it (headers read once, lazily)
        self.hits = self.misses = 0

    @staticmethod
    def for_model(model, directory: str | Path, image_size: int) -> "FeatureCache":
        """The cache of `model`'s frozen image path at `image_size` px (fp32 tokens of the model's weights)."""
        cfg = model.cfg
        if image_size != cfg.image_size:
            raise ValueError(f"feature cache: image_size {image_size} differs from the model's {cfg.image_size}")
        dtype = model.projector.image_projection.weight.dtype
        return FeatureCache(directory, image_path_hash(model, image_size), cfg.num_image_tokens(),
                            cfg.encoder.d_model, dtype)

    # ---- shards -------------------------------------------------------------------------------------------
    @staticmethod
    def shard_of(image_id: str) -> str:
        return f"features-{hashlib.sha1(image_id.encode()).hexdigest()[:SHARD_DIGITS]}.safetensors"

    def _metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "key": self.key, "shape": json.dumps(list(self.shape)),
                "dtype": str(self.dtype).removeprefix("torch.")}

    def _index(self, shard: str) -> set[str]:
        """The image ids a shard holds, after checking its metadata and every tensor's shape and dtype (headers
        only: the tokens are read on demand, so a large cache is not held in memory)."""
        if shard in self._shards:
            return self._shards[shard]
        path = self.root / shard
        names: set[str] = set()
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    headers = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                               for name in f.keys()}
            except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
                raise ValueError(f"{path}: not a readable feature shard ({type(e).__name__}: {e}); delete it "
                                 f"to recompute its images") from None
            want = self._metadata()
            for field in ("format", "key", "shape", "dtype"):
                if meta.get(field) != want[field]:
                    raise ValueError(f"{path}: metadata {field} is {meta.get(field)!r}, expected {want[field]!r} "
                                     f"(another model, image size or cache version wrote it)")
            for name, (shape, dtype) in headers.items():
                if shape != self.shape or dtype != _ST_DTYPES[self.dtype]:
                    raise ValueError(f"{path}: image {name!r} has tokens {shape} {dtype}, expected {self.shape} "
                                     f"{_ST_DTYPES[self.dtype]}")
                if self.shard_of(name) != shard:
                    raise ValueError(f"{path}: image {name!r} belongs to shard {self.shard_of(name)}")
            names = set(headers)
        self._shards[shard] = names
        return names

    def _load(self, shard: str, names: Iterable[str]) -> dict[str, torch.Tensor]:
        path = self.root / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_tensor(name) for name in names}
        except Exception as e:  # noqa: BLE001 - changed or truncated since its header was checked
            raise ValueError(f"{path}: cannot read image tokens ({type(e).__name__}: {e})") from None

    def get(self, image_id: str) -> torch.Tensor | None:
        """(N_img, d) tokens of the image, or None when it is not cached."""
        shard = self.shard_of(image_id)
        if image_id not in self._index(shard):
            self.misses += 1
            return None
        self.hits += 1
        return self._load(shard, [image_id])[image_id]

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._index(self.shard_of(image_id))

    def put(self, tokens: dict[str, torch.Tensor]) -> None:
        """Add {image id: (N_img, d) tokens}; every touched shard is rewritten atomically (tmp + rename)."""
        by_shard: dict[str, dict[str, torch.Tensor]] = {}
        for image_id, t in tokens.items():
            if tuple(t.shape) != self.shape or t.dtype != self.dtype:
                raise ValueError(f"feature cache {self.root}: image {image_id!r} tokens {tuple(t.shape)} {t.dtype}, "
                                 f"expected {self.shape} {self.dtype}")
            by_shard.setdefault(self.shard_of(image_id), {})[image_id] = t.detach().to("cpu").contiguous()
        self.root.mkdir(parents=True, exist_ok=True)
        for shard, new in by_shard.items():
            old = self._index(shard) - set(new)
            merged = {**(self._load(shard, old) if old else {}), **new}
            path = self.root / shard
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(merged, str(tmp), metadata=self._metadata())
            os.replace(tmp, path)
            self._shards[shard] = set(merged)

    # ---- filling ------------------------------------------------------------------------------------------
    def fill(self, model, pipeline, batch: int = 32, autocast=None, write_bytes: int = 256 << 20) -> dict[str, int]:
        """Compute and store the tokens of every image of `pipeline` (a data.DataPipeline) not cached yet, in
        batches of `batch` images through model.frozen_image_tokens (the training step's own path, so the
        stored bits are the recomputed ones). The tokens are written once `write_bytes` of them are held (and at
        the end, or when the fill stops on an error), so that a fill rewrites each shard about once per
        `write_bytes`, not once per batch. Unreadable images are left to the pipeline (it skips them on its
        first visit). Returns {"cached": already there, "computed": new, "unreadable": skipped}."""
        if not model.image_path_frozen():
            raise ValueError("feature cache: the image path trains under this policy (trainable=all); its tokens "
                             "change every step")
        if model.image_path_stochastic():
            raise ValueError("feature cache: drop_path is active in the frozen vision tower (train mode, "
                             f"model.vision.drop_path={model.cfg.vision.drop_path}): every visit draws other "
                             "tokens; set --model.vision.drop_path=0 to cache")
        saved, pipeline.features = pipeline.features, None
        device = next(model.parameters()).device
        counts = {"cached": 0, "computed": 0, "unreadable": 0}
        pending: list[tuple[str, torch.Tensor]] = []
        held: dict[str, torch.Tensor] = {}  # computed, not yet written
        held_bytes = [0]

        def compute():
            if not pending:
                return
            pixels = torch.stack([p for _, p in pending]).to(device)
            with autocast if autocast is not None else contextlib.nullcontext():
                tokens = model.frozen_image_tokens(pixels)
            for (image_id, _), t in zip(pending, tokens):
                held[image_id] = t.to(self.dtype).cpu()
                held_bytes[0] += held[image_id].numel() * held[image_id].element_size()
            counts["computed"] += len(pending)
            pending.clear()

        def write():
            if held:
                self.put(held)
                held.clear()
                held_bytes[0] = 0

        try:
            for idx in _unique(range(len(pipeline.records)), pipeline.image_ids):
                image_id = pipeline.image_ids[idx]
                if image_id in self:
                    counts["cached"] += 1
                    continue
                try:
                    pixels, _ = pipeline.load_image(idx)
                except Exception:  # noqa: BLE001 - the pipeline counts and skips it when it visits the record
                    counts["unreadable"] += 1
                    continue
                pending.append((image_id, pixels))
                if len(pending) == batch:
                    compute()
                    if held_bytes[0] >= write_bytes:
                        write()
            compute()
        finally:
            pipeline.features = saved
            write()  # what was computed is kept, also when the fill stops on an error
        return counts


def _unique(indices: Iterable[int], ids: list[str]):
    seen = set()
    for i in indices:
        if ids[i] not in seen:
            seen.add(ids[i])
            yield i
