"""The model against transformers' own Gemma2 and Florence2 on tiny random configs (CPU, fp32).

Weights travel through our importers (saved by transformers with save_pretrained, read by florenz_fast.convert),
so these tests check the importers' name maps as well as the numerics.
"""

from __future__ import annotations

import pytest
import torch

from florenz_fast.config import get_config
from florenz_fast.convert import import_florence2
from florenz_fast.florenz import Florenz
from florenz_fast.modules import Layout
from florenz_fast.ops import softcap
from tests.helpers import hf_models
from tests.helpers.hf_models import IMAGE_TOKEN_ID, florence2_reference

TOL = 1e-5


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(scope="module")
def gemma_pair(tmp_path_factory):
    return hf_models.gemma_pair(tmp_path_factory.mktemp("gemma2"))


def test_gemma_decoder_matches_transformers(gemma_pair):
    ref, ours = gemma_pair
    cfg = ours.cfg.decoder
    assert cfg.layers >= 3 and cfg.heads == 2 * cfg.kv_heads and cfg.attn_softcap and cfg.final_softcap
    L = 3 * cfg.sliding_window + 5  # longer than the window: the sliding layers really slide
    ids = torch.randint(3, cfg.vocab_size, (2, L), generator=torch.Generator().manual_seed(0))
    enc = torch.randn(2, 7, ours.cfg.encoder.d_model)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours.logits(ours.decode(ids, enc, Layout()))
    assert want.abs().max() > 1.0  # the comparison is not between near-zero tensors
    assert _max_diff(got, want) <= TOL


def test_gemma_window_is_effective(gemma_pair):
    """Guard against a test that passes whatever the window: the same model without a window differs."""
    ref, ours = gemma_pair
    L = 3 * ours.cfg.decoder.sliding_window + 5
    ids = torch.randint(3, ours.cfg.decoder.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    enc = torch.randn(1, 7, ours.cfg.encoder.d_model)
    with torch.no_grad():
        windowed = ours.logits(ours.decode(ids, enc, Layout()))
        for layer in ours.decoder.layers:
            layer.window = None
        try:
            full = ours.logits(ours.decode(ids, enc, Layout()))
        finally:
            for i, layer in enumerate(ours.decoder.layers):
                layer.window = ours.cfg.decoder.sliding_window if i % 2 == 0 else None
    w = ours.cfg.decoder.sliding_window
    assert _max_diff(windowed[:, :w], full[:, :w]) <= TOL  # inside the window nothing changes
    assert _max_diff(windowed[:, w:], full[:, w:]) > 1e-3


def _florence_pair(name, tmp_path_factory):
    cfg = get_config(name)
    ref = florence2_reference(cfg, seed=2)
    with torch.no_grad():  # logits of order 10, so that the final softcap of 30 is far from the identity
        ref.model.language_model.shared.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("florence2")
    ref.save_pretrained(path)
    ours = Florenz(cfg).eval()
    layout = import_florence2(ours, path)
    assert layout == "native"
    return ref, ours


@pytest.fixture(scope="module", params=["tiny", "tiny-bart"])
def florence_pair(request, tmp_path_factory):
    return _florence_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def florence_bart_pair(tmp_path_factory):
    return _florence_pair("tiny-bart", tmp_path_factory)


def _batch(cfg, image_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, image_size, image_size, generator=g)
    prompt = torch.randint(3, IMAGE_TOKEN_ID, (2, 9), generator=g)
    prompt[:, 0], prompt[0, -1] = 0, 2
    prompt[1, 6], prompt[1, 7:] = 2, 1  # second prompt is shorter: right padding
    mask = prompt != 1
    return pixels, prompt, mask


@pytest.mark.parametrize("image_size", [64, 96])  # 96: stage 2 and 3 maps are padded up to the window
def test_vision_and_encoder_match_transformers(florence_pair, image_size):
    ref, ours = florence_pair
    pixels, prompt, mask = _batch(ours.cfg, image_size)
    n_img = ours.cfg.num_image_tokens(image_size)
    hf_ids = torch.cat([torch.full((2, n_img), IMAGE_TOKEN_ID), prompt], dim=1)
    hf_mask = torch.cat([torch.ones(2, n_img, dtype=torch.long), mask.long()], dim=1)
    with torch.no_grad():
        want_img = ref.model.get_image_features(pixels).pooler_output
        got_img = ours.image_tokens(pixels)
        want_enc = ref.model(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask,
                             decoder_input_ids=torch.full((2, 1), 2)).encoder_last_hidden_state
        got_enc, _ = ours.encode(pixels, prompt, mask)
    assert got_img.shape == (2, n_img, ours.cfg.encoder.d_model)
    assert _max_diff(got_img, want_img) <= TOL
    valid = hf_mask.bool()
    assert _max_diff(got_enc[valid], want_enc[valid]) <= TOL


def test_bart_preset_matches_transformers_logits(florence_bart_pair):
    ref, ours = florence_bart_pair
    pixels, prompt, mask = _batch(ours.cfg, 64, seed=3)
    n_img = ours.cfg.num_image_tokens(64)
    dec_ids = torch.randint(3, IMAGE_TOKEN_ID, (2, 11), generator=torch.Generator().manual_seed(4))
    hf_ids = torch.cat([torch.full((2, n_img), IMAGE_TOKEN_ID), prompt], dim=1)
    hf_mask = torch.cat([torch.ones(2, n_img, dtype=torch.long), mask.long()], dim=1)
    with torch.no_grad():
        want = ref(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, decoder_input_ids=dec_ids).logits
        got = ours(pixels, prompt, dec_ids, attention_mask=mask).logits
    # Florenz applies the final logit softcap of 30 to the BART presets too (SPEC §5); transformers does not
    assert want.abs().max() > 10.0
    assert _max_diff(softcap(want, 30.0), want) > 1e-2  # the softcap is really exercised
    assert _max_diff(got, softcap(want, 30.0)) <= TOL
