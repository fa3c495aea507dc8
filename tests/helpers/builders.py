"""Shared builders: a tiny Florenz with every gate and norm weight open, and one random sample for it."""

from __future__ import annotations

import torch

from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz


def tiny_model(name: str, seed: int = 0) -> Florenz:
    torch.manual_seed(seed)
    model = Florenz(get_config(name)).eval()
    with torch.no_grad():  # non-zero gates and norms so cross-attention and every norm weight matter
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate") or "layernorm" in n or n.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def tiny_sample(cfg, prompt_len, dec_len, seed):
    """pixels (1, 3, image_size, image_size), prompt (1, prompt_len) and decoder ids (1, dec_len)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)
    prompt = torch.randint(3, cfg.encoder.vocab_size, (1, prompt_len), generator=g)
    dec = torch.randint(3, cfg.decoder.vocab_size, (1, dec_len), generator=g)
    return pixels, prompt, dec
