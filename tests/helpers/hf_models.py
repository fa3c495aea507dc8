"""Tiny random transformers reference models whose shapes match our `tiny` / `tiny-bart` presets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import (
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2VisionConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
)

from florenz_fast.config import FlorenzConfig

if TYPE_CHECKING:
    from florenz_fast.florenz import Florenz

IMAGE_TOKEN_ID = 511  # a row of the tiny encoder vocabulary, used by transformers as the image placeholder


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every parameter (norm weights included, which init to 0/1) so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def gemma2_reference(cfg: FlorenzConfig, seed: int = 0) -> Gemma2ForCausalLM:
    d = cfg.decoder
    hf_cfg = Gemma2Config(
        vocab_size=d.vocab_size, hidden_size=d.hidden, intermediate_size=d.ffn, num_hidden_layers=d.layers,
        num_attention_heads=d.heads, num_key_value_heads=d.kv_heads, head_dim=d.head_dim,
        query_pre_attn_scalar=int(d.query_pre_attn_scalar), sliding_window=d.sliding_window,
        attn_logit_softcapping=d.attn_softcap, final_logit_softcapping=d.final_softcap, rms_norm_eps=d.rms_eps,
        rope_theta=d.rope_theta, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    hf_cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(hf_cfg).eval()
    randomize_(model, seed)
    return model


def florence2_reference(cfg: FlorenzConfig, seed: int = 0) -> Florence2ForConditionalGeneration:
    v, e = cfg.vision, cfg.encoder
    vision = Florence2VisionConfig(
        embed_dim=list(v.dims), num_heads=list(v.heads), num_groups=list(v.heads), depths=list(v.depths),
        window_size=v.window, projection_dim=v.projection_dim, drop_path_rate=v.drop_path,
    )
    dec = cfg.decoder if cfg.decoder.kind == "bart" else None
    text = BartConfig(
        vocab_size=e.vocab_size, d_model=e.d_model, encoder_layers=e.layers, encoder_attention_heads=e.heads,
        encoder_ffn_dim=e.ffn, decoder_layers=dec.layers if dec else 1, decoder_attention_heads=e.heads,
        decoder_ffn_dim=dec.ffn if dec else e.ffn, max_position_embeddings=e.max_positions,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, scale_embedding=False,
        activation_function="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
    )
    hf_cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID)
    hf_cfg._attn_implementation = "eager"
    model = Florence2ForConditionalGeneration(hf_cfg).eval()
    randomize_(model, seed, std=0.1)
    return model


def gemma_pair(directory) -> tuple[Gemma2ForCausalLM, Florenz]:
    """A random tiny Gemma2ForCausalLM (seed 1) and the `tiny` Florenz holding its weights through our Gemma-2
    importer (saved to and read from `directory`); the gates stay 0, so the decoder is that Gemma-2."""
    from florenz_fast.config import get_config
    from florenz_fast.convert import import_gemma2
    from florenz_fast.florenz import Florenz

    cfg = get_config("tiny")
    ref = gemma2_reference(cfg, seed=1)
    ref.save_pretrained(directory)
    ours = Florenz(cfg).eval()
    import_gemma2(ours, directory)
    return ref, ours
