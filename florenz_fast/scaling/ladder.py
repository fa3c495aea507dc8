"""The model ladder of the sweep (sizes x widths/depths) and the languages and loss groups it is evaluated on."""

from __future__ import annotations

import torch

from ..config import FlorenzConfig, get_config

# ---- the model ladder ---------------------------------------------------------------------------------------
# (kind, vision base width w -> DaViT dims (w, 2w, 4w, 8w), shared width d of projection/encoder/decoder,
#  encoder layers, decoder layers, heads). ffn = 2d everywhere; Gemma kv_heads = heads/2.
# Parameter counts (all parameters; all train from scratch) are computed from the built model.
LADDER: dict[str, tuple] = {
    "gemma-0.24m": ("gemma2", 8, 32, 1, 2, 2),
    "gemma-0.67m": ("gemma2", 12, 64, 2, 3, 4),
    "gemma-1.4m": ("gemma2", 16, 96, 2, 4, 4),
    "gemma-2.0m": ("gemma2", 16, 128, 3, 4, 4),
    "gemma-5.6m": ("gemma2", 24, 192, 4, 6, 4),
    "gemma-22m": ("gemma2", 32, 384, 6, 8, 8),  # GPU sizes: same command with --device=cuda
    "gemma-60m": ("gemma2", 48, 640, 8, 10, 10),
    "bart-0.64m": ("bart", 12, 64, 2, 2, 4),
}

IN_LANGS = ("en", "de")  # captioning seen in training (SPEC §8)
UNSEEN_LANGS = ("fr", "es")  # translation only in training; captions only in the held-out set
ALL_LANGS = IN_LANGS + UNSEEN_LANGS
GROUPS = {"in_distribution": tuple(f"caption-{lang}" for lang in IN_LANGS),
          "unseen": tuple(f"caption-{lang}" for lang in UNSEEN_LANGS)}
GROUP_NAMES = ("in_distribution", "unseen", "translation")


def model_config(size: str, image_size: int = 64) -> FlorenzConfig:
    """A FlorenzConfig for a ladder entry (vocabulary 512: the synthetic tokenizers)."""
    if size not in LADDER:
        raise KeyError(f"unknown size {size!r}; known: {', '.join(LADDER)}")
    kind, w, d, enc_layers, dec_layers, heads = LADDER[size]
    cfg = get_config("tiny" if kind == "gemma2" else "tiny-bart")
    cfg.name, cfg.image_size = size, image_size
    cfg.vision.dims, cfg.vision.projection_dim = (w, 2 * w, 4 * w, 8 * w), d
    e = cfg.encoder
    e.d_model, e.layers, e.heads, e.ffn = d, enc_layers, heads, 2 * d
    dec = cfg.decoder
    dec.hidden, dec.layers, dec.heads, dec.head_dim, dec.ffn, dec.encoder_width = (
        d, dec_layers, heads, d // heads, 2 * d, d)
    if kind == "gemma2":
        dec.kv_heads, dec.query_pre_attn_scalar = max(1, heads // 2), float(d // heads)
    else:
        dec.kv_heads = heads
    return cfg.validate()


def count_config_parameters(cfg: FlorenzConfig) -> int:
    """All parameters of the model `cfg` describes, counted on the meta device (nothing allocated);
    florenz.count_parameters(model) counts a built model."""
    from ..florenz import Florenz

    with torch.device("meta"):
        return sum(p.numel() for p in Florenz(cfg).parameters())
