"""The cached decode step's fast pieces (issue 16, decode speed): the grouped cross-attention over per-image K/V in
heads layout, the per-generation step context (fused q|k|v and gate|up weights), the CPU norms and the CPU
sigmoid form of the logit softcap. Each against the model's full forward (the training path) or ops.attention's
reference; float64 to 1e-12 (the step orders its sums differently), float32 to the tolerance stated."""

from __future__ import annotations

import pytest
import torch

from florenz_fast import ops
from florenz_fast.generate import GenerationConfig, generate
from florenz_fast.modules import Layout, StepLayer, cross_attend_step
from tests.helpers.builders import tiny_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("masked", [False, True])
def test_cross_attend_step_is_the_reference(softcap, masked):
    """beams x (H / Hk) query rows per KV head against the image's K/V == ops.attention (torch) on K/V repeated per
    beam, with the encoder key mask."""
    g = torch.Generator().manual_seed(0)
    B, beams, H, Hk, S, D = 3, 2, 4, 2, 6, 8
    q = torch.randn(B * beams, 1, H * D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hk, S, D, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5], dtype=torch.bool) if masked else None
    out = cross_attend_step(q, k, v, mask, heads=H, beams=beams, scale=0.3, softcap=softcap)
    rep = lambda t: t.repeat_interleave(beams, dim=0)
    ref = ops.attention(q.view(B * beams, 1, H, D).transpose(1, 2), rep(k), rep(v),
                        key_padding_mask=None if mask is None else rep(mask), causal=False, scale=0.3,
                        softcap=softcap, backend="torch")
    assert out.shape == (B * beams, 1, H * D)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B * beams, 1, H * D), rtol=0, atol=1e-13)


def _full_logits(model, ids_NL, enc, layout_N):
    return model.logits(model.decode(ids_NL, enc, layout_N))


# float32: the step's logits differ from the full forward by the sigmoid softcap (within 2e-7 of tanh, times the
# cap of 30: ~6e-6) and by the order of the sums: at most 4.4e-6 measured here (float64: 8e-15)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1.5e-5)])
@pytest.mark.parametrize("name", ["tiny", "tiny-bart"])
@torch.no_grad()
def test_decode_step_equals_full_forward(name, dtype, atol):
    """decode_step position by position (past the tiny window of 8: the ring wraps) == the last-position logits of
    the full decoder forward, for every row; 2 images x 2 beams with different tokens per beam and a padded
    encoder mask."""
    model = tiny_model(name, seed=1).to(dtype)
    cfg = model.cfg
    g = torch.Generator().manual_seed(2)
    B, beams, L = 2, 2, 11
    enc = torch.randn(B, 5, cfg.decoder.encoder_width, generator=g, dtype=dtype)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], dtype=torch.bool)
    ids = torch.randint(3, cfg.decoder.vocab_size, (B * beams, L), generator=g)
    caches = model.decoder.allocate_cache(B * beams, L, dtype, "cpu")
    ctx = model.decoder.step_layers(model.decoder.cross_kv(enc))
    assert all(isinstance(c, StepLayer) for c in ctx)
    enc_N, layout_N = enc.repeat_interleave(beams, 0), Layout(mask=mask.repeat_interleave(beams, 0))
    for p in range(L):
        step = model.decode_step(ids[:, p], torch.tensor(p), caches, ctx, Layout(mask=mask), beams)
        full = _full_logits(model, ids[:, :p + 1], enc_N, layout_N)[:, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=atol)


@torch.no_grad()
def test_step_context_follows_weight_changes():
    """The fused step weights are built per generation: after an in-place update of the decoder's parameters (as an
    optimizer step does), the cached search is the uncached one of the new weights, not the old one's."""
    model = tiny_model("tiny", seed=3).double()
    cfg = model.cfg
    g = torch.Generator().manual_seed(4)
    px = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    ids = torch.randint(3, 100, (2, 6), generator=g)
    gen = GenerationConfig.for_model(cfg, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    before = generate(model, px, ids, config=gen)
    for layer in model.decoder.layers:
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.weight, layer.mlp.up_proj.weight):
            w.add_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    after = generate(model, px, ids, config=gen)
    uncached = generate(model, px, ids, config=gen, cache=False)
    assert after.tokens == uncached.tokens
    torch.testing.assert_close(after.scores, uncached.scores, rtol=0, atol=1e-10)
    assert after.tokens != before.tokens


def test_step_refuses_a_packed_encoder_layout():
    model = tiny_model("tiny")
    caches = model.decoder.allocate_cache(1, 4, torch.float32, "cpu")
    enc = torch.randn(1, 5, model.cfg.decoder.encoder_width)
    with pytest.raises(ValueError, match="padded encoder layout"):
        model.decode_step(torch.tensor([3]), torch.tensor(0), caches, model.decoder.cross_kv(enc),
                          Layout.from_lengths([5]), 1)
