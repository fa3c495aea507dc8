"""Checkpoint layouts: our own format, the released Florenz layout, Florence-2 (Microsoft and transformers-native)
and Hugging Face Gemma-2.

Every layout is described as a rename of *our* state-dict keys (plus a transpose for the one tensor Microsoft's
code stores as a bare matrix), so one function per layout covers import and export alike:

    load_pretrained(dir)                          our format: config.json + safetensors (sharded or not)
    save_pretrained(model, dir)
    import_florenz_released(model, path)          released Florenz checkpoints (florenz_checkpoint_keys.json)
    import_florence2(model, path)                 Florence-2 vision tower + projector + encoder (+ BART decoder)
    import_gemma2(model, path)                    a Gemma-2 causal-LM checkpoint into the Gemma decoder
    export_state_dict(model, layout)              tensors named as in `layout`

Errors name the checkpoint and list missing, unexpected and mis-shaped keys (checkpoint.CheckpointError).
"""

from __future__ import annotations

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
    """Load a released Florenz checkpoint (names as in florenz_checkpoint_keys.json) into `model`."""
    _load_part(model, _as_source(path), "released",
               _keys_under(model, ("vision_tower.", "projector.", "encoder.", "decoder.")), ignore=lambda k: False,
               dtype=dtype, device=device)


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


# ---- our own format -------------------------------------------------------------------------------------

CONFIG_NAME = "config.json"


def save_pretrained(model: Florenz, out_dir, *, max_shard_bytes: int = 5 * 2**30) -> Path:
    """config.json + safetensors (sharded above max_shard_bytes), written atomically."""
    out_dir = Path(out_dir)
    save_state_dict(model.state_dict(), out_dir, max_shard_bytes=max_shard_bytes,
                    metadata={"writer": "florenz-fast", "preset": model.cfg.name})
    tmp = out_dir / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tmp.replace(out_dir / CONFIG_NAME)
    return out_dir


def load_pretrained(path, *, dtype=None, device=None, config: FlorenzConfig | None = None) -> Florenz:
    """Build the model on the meta device and fill it from `path` (never the whole file in RAM twice)."""
    path = Path(path)
    if config is None:
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a florenz-fast checkpoint directory)")
        config = FlorenzConfig.load(path / CONFIG_NAME)
    source = open_checkpoint(path)
    with torch.device("meta"):
        model = Florenz(config)
    load_into(model, source, strict=True, dtype=dtype, device=device)
    if device is not None:
        model.to(device)  # the non-persistent buffers (RoPE frequencies) are in no checkpoint
    return model.eval()
