"""Checkpoint layouts: our own format, the released Florenz layout, Florence-2 (Microsoft and transformers-native)
and Hugging Face Gemma-2.

Every layout is described as a rename of *our* state-dict keys (plus a transpose for the one tensor Microsoft's
code stores as a bare matrix), so one function per layout covers import and export alike:

    load_pretrained(dir)                          our format, or a released directory as published (detected)
    save_pretrained(model, dir, layout=)          ours (default) or "released" (official config.json + names)
    import_florenz_released(model, path)          released Florenz checkpoints (florenz_checkpoint_keys.json)
    import_florence2(model, path)                 Florence-2 vision tower + projector + encoder (+ BART decoder)
    import_gemma2(model, path)                    a Gemma-2 causal-LM checkpoint into the Gemma decoder
    export_state_dict(model, layout)              tensors named as in `layout`

Errors name the checkpoint and list missing, unexpected and mis-shaped keys (checkpoint.CheckpointError).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint import CheckpointError, load_into, open_checkpoint, save_state_dict
from .config import FlorenzConfig
from .florenz import Florenz

LAYOUTS = ("ours", "released", "microsoft", "native", "gemma2")
_RELEASED_HEAD = "language_model.lm_head.weight"  # tied to language_model.model.decoder.embed_tokens.weight

# Our vision-tower names are transformers' native ones; Microsoft's (and so the released Florenz checkpoints)
# wrap each sub-layer in PreNorm/Residual helpers, hence the `.fn.` levels.
_MICROSOFT_VISION = [
    (r"^vision_tower\.convs\.(\d+)\.conv\.", r"vision_tower.convs.\1.proj."),
    (r"\.(spatial_block|channel_block)\.conv([12])\.", r".\1.conv\2.fn.dw."),
    (r"\.spatial_block\.norm1\.", ".spatial_block.window_attn.norm."),
    (r"\.channel_block\.norm1\.", ".channel_block.channel_attn.norm."),
    (r"\.(window_attn|channel_attn)\.(qkv|proj)\.", r".\1.fn.\2."),
    (r"\.(spatial_block|channel_block)\.norm2\.", r".\1.ffn.norm."),
    (r"\.ffn\.(fc[12])\.", r".ffn.fn.net.\1."),
]
_MICROSOFT_PREFIX = [
    ("projector.image_projection.weight", "image_projection"),
    ("projector.image_proj_norm.", "image_proj_norm."),
    ("projector.image_position_embed.", "image_pos_embed."),
    ("projector.visual_temporal_embed.", "visual_temporal_embed."),
    ("encoder.", "language_model.model.encoder."),
    ("decoder.", "language_model.model.decoder."),
]
_NATIVE_PREFIX = [
    ("vision_tower.", "model.vision_tower."),
    ("projector.", "model.multi_modal_projector."),
    ("encoder.", "model.language_model.encoder."),
    ("decoder.", "model.language_model.decoder."),
]
_TRANSPOSED = {"projector.image_projection.weight"}  # (d, C) for us, a bare (C, d) matrix for Microsoft


def _replace_prefix(key: str, table) -> str:
    for ours, theirs in table:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def external_name(key: str, layout: str) -> str:
    """The name of our state-dict key `key` in `layout` ('released' and 'microsoft' are the same naming)."""
    if layout == "ours":
        return key
    if layout in ("released", "microsoft"):
        for pattern, repl in _MICROSOFT_VISION:
            key = re.sub(pattern, repl, key)
        return _replace_prefix(key, _MICROSOFT_PREFIX)
    if layout == "native":
        return _replace_prefix(key, _NATIVE_PREFIX)
    if layout == "gemma2":  # a Hugging Face Gemma2ForCausalLM: our decoder is its `model`
        return _replace_prefix(key, [("decoder.", "model.")])
    raise ValueError(f"unknown layout {layout!r}; known: {LAYOUTS}")


def _aliases(key: str, layout: str) -> list[str]:
    """Other names a checkpoint may store a tied tensor under (checked after the main name)."""
    if key == "decoder.embed_tokens.weight":
        return {"released": ["language_model.lm_head.weight"], "microsoft": ["language_model.lm_head.weight",
                "language_model.model.shared.weight"], "native": ["lm_head.weight",
                "model.language_model.shared.weight"], "gemma2": ["lm_head.weight"]}.get(layout, [])
    if key == "encoder.embed_tokens.weight":
        return {"microsoft": ["language_model.model.shared.weight"],
                "native": ["model.language_model.shared.weight"]}.get(layout, [])
    return []


def _needs_transpose(key: str, layout: str) -> bool:
    return key in _TRANSPOSED and layout in ("released", "microsoft")


class _View(Mapping):
    """A checkpoint seen through our names: lazy, shape-only validation, transposes applied on access."""

    def __init__(self, source, names: dict[str, str], transposed: set[str]):
        self.source, self.names, self.transposed = source, names, transposed
        self.path = getattr(source, "path", "<in-memory mapping>")

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.source[self.names[key]]
        return t.t() if key in self.transposed else t

    def shape(self, key: str) -> torch.Size:
        src = self.names[key]
        shape = self.source.shape(src) if hasattr(self.source, "shape") else self.source[src].shape
        return torch.Size(reversed(tuple(shape))) if key in self.transposed else torch.Size(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _load_part(model: Florenz, source, layout: str, ours: list[str], *, ignore: Callable[[str], bool],
               dtype=None, device=None) -> None:
    """Load the tensors `ours` (our state-dict names) of `model` from `source` (in `layout`) - all or nothing.

    Checkpoint keys that belong to no loaded part must satisfy `ignore`, else they are reported as unexpected.
    """
    names, missing = {}, []
    for key in ours:
        candidates = [external_name(key, layout), *_aliases(key, layout)]
        found = next((c for c in candidates if c in source), None)
        if found is None:
            missing.append(candidates[0])
        else:
            names[key] = found
    used = set(names.values()) | {a for k in ours for a in _aliases(k, layout)}
    unexpected = sorted(k for k in source.keys() if k not in used and not ignore(k))
    if missing or unexpected:
        path = getattr(source, "path", "<in-memory mapping>")
        raise CheckpointError(
            f"cannot import {path} ({layout} layout) into {model.cfg.name!r}:"
            + (f"\n  missing keys ({len(missing)}): {_short(missing)}" if missing else "")
            + (f"\n  unexpected keys ({len(unexpected)}): {_short(unexpected)}" if unexpected else "")
        )
    transposed = {k for k in names if _needs_transpose(k, layout)}
    load_into(model, _View(source, names, transposed), strict=False, dtype=dtype, device=device)


def _keys_under(model: Florenz, prefixes: tuple[str, ...]) -> list[str]:
    return [k for k in model.state_dict() if k.startswith(prefixes)]


def _short(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... and {len(keys) - n} more" if len(keys) > n else "")


def _as_source(path_or_mapping):
    return path_or_mapping if isinstance(path_or_mapping, Mapping) else open_checkpoint(path_or_mapping)


# ---- released Florenz checkpoints ---------------------------------------------------------------------

def export_state_dict(model: Florenz, layout: str = "released") -> dict[str, torch.Tensor]:
    """State dict renamed into `layout` (tensors shared, not copied); the tied lm_head appears under its name."""
    out = {}
    for key, t in model.state_dict().items():
        out[external_name(key, layout)] = t.t() if _needs_transpose(key, layout) else t
    head = {"released": "language_model.lm_head.weight", "microsoft": "language_model.lm_head.weight",
            "native": "lm_head.weight"}.get(layout)
    if head is not None:
        out[head] = out[external_name("decoder.embed_tokens.weight", layout)]
    return out


def import_florenz_released(model: Florenz, path, *, dtype=None, device=None) -> None:
    """Load a released Florenz checkpoint (names as in florenz_checkpoint_keys.json) into `model`.

    The tied lm_head may be stored under its own name, beside the embedding or instead of it; stored beside it,
    it must hold the same values (this engine ties them, SPEC §4-§5, and would otherwise drop a trained head).
    """
    source = _as_source(path)
    embed = external_name("decoder.embed_tokens.weight", "released")
    if embed in source and _RELEASED_HEAD in source and not _same_tensor(source, embed, _RELEASED_HEAD):
        raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: {_RELEASED_HEAD} differs from {embed}; "
                              "Florenz ties the two (SPEC §4-§5), so an untied head cannot be loaded")
    _load_part(model, source, "released",
               _keys_under(model, ("vision_tower.", "projector.", "encoder.", "decoder.")), ignore=lambda k: False,
               dtype=dtype, device=device)


def _same_tensor(source, a: str, b: str) -> bool:
    """Equal shape and values; the values are read (mmapped) only when the shapes agree."""
    shape = (lambda k: source.shape(k)) if hasattr(source, "shape") else (lambda k: source[k].shape)
    return shape(a) == shape(b) and torch.equal(source[a], source[b])


# ---- Florence-2 -----------------------------------------------------------------------------------------

def detect_florence2_layout(source) -> str:
    keys = source.keys()
    if any(k.startswith("model.vision_tower.") for k in keys):
        return "native"
    if any(k.startswith("vision_tower.") for k in keys):
        return "microsoft"
    raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: neither a Microsoft nor a transformers-native "
                          "Florence-2 checkpoint (no vision_tower.* or model.vision_tower.* keys)")


def import_florence2(model: Florenz, path, *, with_decoder: bool | None = None, dtype=None, device=None) -> str:
    """Load Florence-2 weights (either layout, detected) into the vision tower, projector and encoder.

    with_decoder (default: when the model has a BART decoder of the same vocabulary) also loads the BART
    decoder. Returns the detected layout. The Florence-2 decoder is otherwise ignored, as is the all-zero
    `final_logits_bias` buffer of Microsoft's checkpoints (a non-zero one is an error: we have no such term).
    """
    source = _as_source(path)
    layout = detect_florence2_layout(source)
    dec = model.cfg.decoder
    if with_decoder is None:
        with_decoder = dec.kind == "bart" and rows_of(source, "decoder.embed_tokens.weight", layout) == dec.vocab_size
    parts = ("vision_tower.", "projector.", "encoder.") + (("decoder.",) if with_decoder else ())
    for bias_key in ("language_model.final_logits_bias", "model.language_model.final_logits_bias",
                     "final_logits_bias"):
        if bias_key in source and bool(source[bias_key].any()):
            raise CheckpointError(f"{source.path}: {bias_key} is non-zero; Florenz has no final logits bias")
    decoder_prefix = external_name("decoder.", layout)

    def ignore(k: str) -> bool:
        return (not with_decoder and (k.startswith(decoder_prefix) or k in ("lm_head.weight",
                "language_model.lm_head.weight"))) or k.endswith("final_logits_bias")

    _load_part(model, source, layout, _keys_under(model, parts), ignore=ignore, dtype=dtype, device=device)
    return layout


def rows_of(source, key_ours: str, layout: str) -> int | None:
    """Rows (dim 0) of our tensor `key_ours` as stored in `source` (main name or a tied alias); None if absent."""
    for key in (external_name(key_ours, layout), *_aliases(key_ours, layout)):
        if key in source:
            return int((source.shape(key) if hasattr(source, "shape") else source[key].shape)[0])
    return None


# ---- Gemma-2 --------------------------------------------------------------------------------------------

_GEMMA_OWN = ("encoder_attn", "post_encoder_attention_layernorm")  # ours only: cross-attention and its norm


def import_gemma2(model: Florenz, path, *, dtype=None, device=None) -> None:
    """Load a Hugging Face Gemma-2 causal-LM checkpoint (model.*, lm_head tied) into the Gemma decoder.

    Cross-attention weights, gates and post-encoder norms are not in Gemma-2 and are left as they are
    (florenz_fast.prepare initialises them per SPEC §4).
    """
    if model.cfg.decoder.kind != "gemma2":
        raise ValueError(f"preset {model.cfg.name!r} has a {model.cfg.decoder.kind} decoder, not Gemma-2")
    ours = [k for k in _keys_under(model, ("decoder.",)) if not any(p.startswith(_GEMMA_OWN) for p in k.split("."))]
    _load_part(model, _as_source(path), "gemma2", ours, ignore=lambda k: False, dtype=dtype, device=device)


# ---- checkpoint directories: ours and the released layout -------------------------------------------------

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
DEFAULT_IMAGE_SIZE = 768  # SPEC §2: fine-tuning and evaluation resolution, the released processors' size


def save_pretrained(model: Florenz, out_dir, *, max_shard_bytes: int = 5 * 2**30, layout: str = "ours") -> Path:
    """config.json + safetensors (sharded above max_shard_bytes), written atomically.

    layout="released" writes what the published Florenz code loads: the official config.json
    (FlorenzConfig.to_released; a config it cannot express raises before anything is written), the released key
    names (florenz_checkpoint_keys.json) with the tied lm_head stored once under the decoder embedding's name, as
    transformers saves tied weights, and a preprocessor_config.json carrying the image size.
    """
    if layout not in ("ours", "released"):
        raise ValueError(f"save_pretrained: layout must be 'ours' or 'released', got {layout!r}")
    out_dir = Path(out_dir)
    meta = {"writer": "florenz-fast", "preset": model.cfg.name}
    if layout == "ours":
        save_state_dict(model.state_dict(), out_dir, max_shard_bytes=max_shard_bytes, metadata=meta)
        _write_json(out_dir / CONFIG_NAME, model.cfg.to_dict())
        return out_dir
    config_json = model.cfg.to_released()
    save_state_dict(released_state_dict(model), out_dir, max_shard_bytes=max_shard_bytes, metadata=meta)
    _write_json(out_dir / CONFIG_NAME, config_json)
    _write_json(out_dir / PREPROCESSOR_NAME, released_preprocessor_config(model.cfg))
    return out_dir


def released_state_dict(model: Florenz) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained(layout="released") writes: the released names less the tied lm_head."""
    out = export_state_dict(model, "released")
    del out[_RELEASED_HEAD]  # tied: a loader that finds only the head would tie a random embedding to it
    return out


def released_preprocessor_config(cfg: FlorenzConfig) -> dict:
    """A Florence-2 processor config for `cfg`: bicubic square resize to the image size, ImageNet mean/std."""
    return {
        "processor_class": "Florence2Processor", "image_processor_type": "CLIPImageProcessor",
        "do_resize": True, "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 3,
        "do_center_crop": False, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_seq_length": cfg.num_image_tokens(),
    }


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_released_config(data: dict) -> bool:
    """Whether a config.json is the official (Florence-2 style) one rather than ours (vision/encoder/decoder)."""
    return "vision_config" in data or "text_config" in data or data.get("model_type") == "florence2"


def released_image_size(directory) -> int | None:
    """The square image size of a released directory's preprocessor_config.json (`size.height/width`, as the
    Florence-2 processor writes it); None without that file. Errors name the file and the key."""
    path = Path(directory) / PREPROCESSOR_NAME
    if not path.is_file():
        return None
    data = _read_json(path)
    size = data.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        height, width = size["height"], size["width"]
    else:
        raise ValueError(f"{path}: size: expected {{\"height\": H, \"width\": W}} (the Florence-2 processor's "
                         f"square resize), got {size!r}")
    for key, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{path}: size.{key}: expected a positive int, got {type(value).__name__} {value!r}")
    if height != width:
        raise ValueError(f"{path}: size: {height}x{width} is not square; Florenz resizes to a square (SPEC §2)")
    return height


def load_pretrained(path, *, dtype=None, device=None, config: FlorenzConfig | None = None,
                    image_size: int | None = None) -> Florenz:
    """Build the model on the meta device and fill it from `path` (never the whole file in RAM twice).

    `path` is our directory (config.json of ours + safetensors) or a released one as published (the official
    config.json + safetensors, one file or sharded with an index, with or without a separate lm_head): the
    layout is read off config.json (or, with `config=` and no config.json, off the tensor names). A released
    directory takes its image size from preprocessor_config.json, else 768; `image_size=` overrides either.
    """
    path = Path(path)
    data = _read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else None
    if data is None and config is None:
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (neither a florenz-fast nor a released Florenz "
                                "checkpoint directory)")
    source = open_checkpoint(path)
    released = is_released_config(data) if data is not None else any(k.startswith("language_model.") for k in source)
    if config is None and released:
        size = image_size or released_image_size(path) or DEFAULT_IMAGE_SIZE
        config = FlorenzConfig.from_released(
            data, image_size=size, decoder_vocab_size=rows_of(source, "decoder.embed_tokens.weight", "released"),
            source=str(path / CONFIG_NAME))
    elif config is None:
        config = FlorenzConfig.from_dict(data, source=str(path / CONFIG_NAME))
    if image_size is not None and image_size != config.image_size:
        config = dataclasses.replace(config, image_size=image_size).validate()
    with torch.device("meta"):
        model = Florenz(config)
    if released:
        import_florenz_released(model, source, dtype=dtype, device=device)
    else:
        load_into(model, source, strict=True, dtype=dtype, device=device)
    if device is not None:
        model.to(device)  # the non-persistent buffers (RoPE frequencies) are in no checkpoint
    return model.eval()
