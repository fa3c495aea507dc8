"""Whole-model behaviour on the tiny presets: batching invariance, packing, loss, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from florenz_fast import ops
from florenz_fast.florenz import IGNORE_INDEX
from tests.helpers.builders import tiny_model as _model
from tests.helpers.builders import tiny_sample as _sample

TOL = 1e-5


def _pad(t, length, value):
    return torch.cat([t, torch.full((1, length - t.shape[1]), value, dtype=t.dtype)], dim=1)


@pytest.fixture(params=["tiny", "tiny-bart"])
def model(request):
    return _model(request.param)


def test_gates_are_nonzero_and_matter():
    model = _model("tiny")
    pixels, prompt, dec = _sample(model.cfg, 6, 5, 0)
    with torch.no_grad():
        out = model(pixels, prompt, dec).logits
        for layer in model.decoder.layers:
            layer.encoder_attn_gate.zero_()
        closed = model(pixels, prompt, dec).logits
    assert (out - closed).abs().max() > 1e-3


def test_sample_alone_equals_sample_in_padded_batch(model):
    cfg = model.cfg
    samples = [_sample(cfg, 6, 5, 0), _sample(cfg, 11, 13, 1), _sample(cfg, 3, 1, 2)]
    P, D = 11, 13
    pixels = torch.cat([s[0] for s in samples])
    prompt = torch.cat([_pad(s[1], P, cfg.encoder.pad_id) for s in samples])
    pmask = torch.cat([_pad(torch.ones_like(s[1], dtype=torch.bool), P, False) for s in samples])
    dec = torch.cat([_pad(s[2], D, 0) for s in samples])
    dmask = torch.cat([_pad(torch.ones_like(s[2], dtype=torch.bool), D, False) for s in samples])
    with torch.no_grad():
        batched = model(pixels, prompt, dec, attention_mask=pmask, decoder_attention_mask=dmask).logits
        for i, (px, pr, de) in enumerate(samples):
            alone = model(px, pr, de).logits
            assert (batched[i, : de.shape[1]] - alone[0]).abs().max() <= TOL


def test_extra_encoder_padding_changes_nothing(model):
    cfg = model.cfg
    pixels, prompt, dec = _sample(cfg, 7, 9, 3)
    with torch.no_grad():
        base = model(pixels, prompt, dec).logits
        for extra in (1, 20):
            padded = _pad(prompt, 7 + extra, cfg.encoder.pad_id)
            mask = _pad(torch.ones_like(prompt, dtype=torch.bool), 7 + extra, False)
            out = model(pixels, padded, dec, attention_mask=mask).logits
            assert (out - base).abs().max() <= TOL
        # and the mask is what makes it so: unmasked padding does change the output
        unmasked = model(pixels, _pad(prompt, 27, cfg.encoder.pad_id), dec).logits
    assert (unmasked - base).abs().max() > 1e-4


def _packed_samples(cfg):
    """Three samples of ragged lengths, alone and packed: (samples, pixels, prompt, dec, cu_seqlens kwargs)."""
    samples = [_sample(cfg, 6, 5, 4), _sample(cfg, 10, 12, 5), _sample(cfg, 2, 1, 6)]
    pixels = torch.cat([s[0] for s in samples])
    prompt = torch.cat([s[1] for s in samples], dim=1)
    dec = torch.cat([s[2] for s in samples], dim=1)
    kw = dict(prompt_cu_seqlens=ops.cu_seqlens_from_lengths([s[1].shape[1] for s in samples]),
              decoder_cu_seqlens=ops.cu_seqlens_from_lengths([s[2].shape[1] for s in samples]))
    return samples, pixels, prompt, dec, kw


def test_packed_equals_padded(model):
    samples, pixels, prompt, dec, kw = _packed_samples(model.cfg)
    with torch.no_grad():
        packed = model(pixels, prompt, dec, **kw).logits
        start = 0
        for px, pr, de in samples:
            alone = model(px, pr, de).logits[0]
            assert (packed[0, start:start + de.shape[1]] - alone).abs().max() <= TOL
            start += de.shape[1]


def test_loss_ignores_padding_labels_and_backpropagates(model):
    cfg = model.cfg
    pixels, prompt, dec = _sample(cfg, 5, 6, 7)
    labels = torch.randint(3, cfg.decoder.vocab_size, (1, 6))
    labels[0, 4:] = IGNORE_INDEX
    out = model(pixels, prompt, dec, labels=labels)
    logits = out.logits.detach()[0, :4].double()
    want = torch.nn.functional.cross_entropy(logits, labels[0, :4])
    assert abs(out.loss.item() - want.item()) <= 1e-5
    out.loss.backward()
    assert model.decoder.embed_tokens.weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0


def test_bad_inputs_have_clear_errors():
    model = _model("tiny")
    cfg = model.cfg
    pixels, prompt, dec = _sample(cfg, 4, 3, 8)
    cases = [
        (dict(pixel_values=pixels[:, :1]), "3 channels"),
        (dict(pixel_values=pixels[0]), r"must be \(B, 3, H, W\)"),
        (dict(pixel_values=(pixels * 255).to(torch.uint8)), "floating dtype"),
        (dict(pixel_values=torch.randn(1, 3, 50, 64)), "image size 50x64"),
        (dict(pixel_values=torch.randn(1, 3, 1632, 1632)), "at most 1600"),
        (dict(input_ids=prompt[:, :0]), "input_ids is empty"),
        (dict(input_ids=prompt + cfg.encoder.vocab_size), r"input_ids has ids outside \[0, 512\)"),
        (dict(input_ids=prompt.float()), "must be an integer tensor"),
        (dict(decoder_input_ids=dec[:, :0]), "decoder_input_ids is empty"),
        (dict(pixel_values=torch.cat([pixels, pixels])), "2 images but 1 prompts"),
        (dict(attention_mask=torch.ones(1, 9, dtype=torch.bool)), r"attention_mask has shape \(1, 9\)"),
        (dict(labels=torch.zeros(1, 4, dtype=torch.long)), r"labels \(1, 4\) and decoder_input_ids \(1, 3\)"),
    ]
    for override, message in cases:
        kwargs = dict(pixel_values=pixels, input_ids=prompt, decoder_input_ids=dec) | override
        pv, ids, de = kwargs.pop("pixel_values"), kwargs.pop("input_ids"), kwargs.pop("decoder_input_ids")
        with pytest.raises((ValueError, TypeError), match=message):
            model(pv, ids, de, **kwargs)


def test_encoder_positions_have_a_limit():
    model = _model("tiny")
    cfg = model.cfg
    too_long = torch.randint(3, 100, (1, cfg.encoder.max_positions))  # + image tokens > table
    with pytest.raises(ValueError, match="exceeds the 256 learned positions"):
        model(torch.randn(1, 3, 64, 64), too_long, torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize("backend", ["sdpa+dense", "dense", "flex", "sdpa+flex"])
def test_plain_pytorch_backends_run_the_whole_model(model, backend):
    _, pixels, prompt, dec, kw = _packed_samples(model.cfg)
    with torch.no_grad():
        ref = model(pixels, prompt, dec, **kw).logits
        ops.set_backend(backend)
        try:
            ours = model(pixels, prompt, dec, **kw).logits
        finally:
            ops.set_backend(None)
    assert (ours - ref).abs().max() <= TOL
