"""florenz_kernels.integrations.apply_to / remove_from on tiny random transformers models (fp32, Triton interpreter).

Every comparison follows the kernels' error rule (DESIGN.md 3): the patched fp32 model's error against the eager model
run in float64 must be within 2x the eager fp32 model's error, plus 32 fp32 ulps at the tensor's scale (the kernels'
own tests' slack, justified in tests/helpers/softcap_cases.py: both errors sit at rounding level in fp32).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn as nn
from transformers import (
    BartConfig,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2VisionConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2Model,
)

from florenz_kernels.integrations import apply_to, remove_from
from tests.helpers import error_rule
from tests.helpers.hf_models import randomize_
from tests.helpers.triton_interpreter import DEVICE  # noqa: F401  (conftest has switched the interpreter on)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def assert_2x(ours, ref64, low, what):
    error_rule.assert_within_2x(ours, ref64, low, what, ulps=32)


def gemma2_config(**over) -> Gemma2Config:
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
              attn_logit_softcapping=5.0, final_logit_softcapping=5.0, pad_token_id=0, max_position_embeddings=64)
    kw.update(over)
    cfg = Gemma2Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_gemma2(seed=0, **over) -> Gemma2ForCausalLM:
    # layer 0 slides (window 5 < the 11-17 token inputs), layer 1 is global; softcaps small enough to bend the
    # random model's scores and logits (|s| ~ 5 here)
    model = Gemma2ForCausalLM(gemma2_config(**over)).eval()
    randomize_(model, seed)
    return model


def tiny_florence2(seed=0, attention_dropout=0.0) -> Florence2ForConditionalGeneration:
    vision = Florence2VisionConfig(embed_dim=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], num_groups=[1, 2, 4, 8],
                                   depths=[1, 1, 1, 1], window_size=4, projection_dim=64, drop_path_rate=0.0)
    text = BartConfig(vocab_size=96, d_model=64, encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=96,
                      decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96, max_position_embeddings=64,
                      dropout=0.0, attention_dropout=attention_dropout, activation_dropout=0.0, pad_token_id=1,
                      bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, activation_function="gelu")
    cfg = Florence2Config(vision_config=vision, text_config=text, image_token_id=95)
    cfg._attn_implementation = "eager"
    model = Florence2ForConditionalGeneration(cfg).eval()
    randomize_(model, seed, std=0.1)
    return model


def _ids(B, L, V, seed):
    return torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(seed))


def _padded_batch():
    ids = _ids(2, 11, 64, 1)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def _logits_and_grads(model, g_weight, **inputs):
    """logits and the gradient of sum(logits * g_weight) in every parameter."""
    model.zero_grad()
    logits = model(**inputs).logits
    (logits.double() * g_weight).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _gemma_rms_norm_f64(self, x):
    # Gemma2RMSNorm upcasts with x.float(), i.e. to fp32 even for a float64 model: the float64 reference needs its
    # norms in float64 (same formula, x * rsqrt(mean x^2 + eps) * (1 + w))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _finite_mask(module, args, kwargs):
    # transformers' eager float64 mask adds finfo(float64).min terms that sum to -inf where the padding and the window
    # both mask a key, so a left-padded row that sees nothing becomes NaN, and 0 * NaN leaks into every row through
    # P @ V. Clamped at fp32's min (what the fp32 eager model effectively uses) those rows stay finite.
    am = kwargs.get("attention_mask")
    if torch.is_tensor(am) and am.is_floating_point():
        kwargs["attention_mask"] = am.clamp(min=torch.finfo(torch.float32).min)
    return args, kwargs


def _three(model):
    """(fp32 eager, float64 eager, the fp32 model to patch)."""
    from transformers.models.bart.modeling_bart import BartAttention
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RMSNorm

    eager64 = copy.deepcopy(model).double()
    for m in eager64.modules():
        if isinstance(m, Gemma2RMSNorm):
            m.forward = types.MethodType(_gemma_rms_norm_f64, m)
        if isinstance(m, (Gemma2Attention, BartAttention)):
            m.register_forward_pre_hook(_finite_mask, with_kwargs=True)
    return copy.deepcopy(model), eager64, model


def _as(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}


def _compare_logits_and_grads(model, rows, **inputs):
    eager, eager64, ours = _three(model)
    record = apply_to(ours)
    with torch.no_grad():
        shape = eager(**inputs).logits.shape  # (B, L, V): decoder positions for Florence-2
    g = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * rows[..., None]
    want64, gw64 = _logits_and_grads(eager64, g, **_as(inputs, torch.float64))
    low, gw_low = _logits_and_grads(eager, g, **inputs)
    got, gw = _logits_and_grads(ours, g, **inputs)
    assert set(gw) == set(gw64) and len(gw) > 10
    real = rows.bool()
    assert not torch.equal(got[real], low[real])  # the kernels ran: their rounding differs from eager's
    assert_2x(got[real], want64[real], low[real], "logits")
    for n in gw64:
        assert_2x(gw[n], gw64[n], gw_low[n], f"grad {n}")
    return record


# ---- Gemma2ForCausalLM ------------------------------------------------------------------------------------------


def test_gemma2_record_lists_every_change():
    model = tiny_gemma2()
    record = apply_to(model)
    assert record.architecture == "Gemma2ForCausalLM"
    assert record.attention == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert len(record.rms_norm) == 9 and "model.norm" in record.rms_norm  # 4 per layer + the final norm
    assert record.mlp == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert record.loss == [""] and record.skipped == {}
    assert model.model.layers[0].self_attn.config._attn_implementation == record.attn_implementation
    assert model.model.layers[0].self_attn.sliding_window == 5  # a windowed layer is exercised (11 > 5)
    remove_from(model)


@pytest.mark.slow
def test_gemma2_padded_logits_and_gradients_match_eager():
    ids, mask = _padded_batch()
    _compare_logits_and_grads(tiny_gemma2(), mask, input_ids=ids, attention_mask=mask, use_cache=False)


@pytest.mark.slow
def test_gemma2_packed_position_ids_match_separate_sequences():
    # three sequences packed into one row (B = 1, no mask): the kernel's varlen path from position_ids, vs the
    # float64 eager model run on each sequence alone (so packing really isolates them, window included)
    model = tiny_gemma2(seed=2)
    lengths = [7, 3, 9]
    ids = _ids(1, sum(lengths), 64, 3)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    eager, eager64, ours = _three(model)
    apply_to(ours)
    with torch.no_grad():
        low = eager(input_ids=ids, position_ids=pos, use_cache=False).logits
        got = ours(input_ids=ids, position_ids=pos, use_cache=False).logits
        cu = torch.tensor([0, 7, 10, 19], dtype=torch.int32)
        got_cu = ours(input_ids=ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=9, max_length_k=9).logits
        want64 = torch.cat([eager64(input_ids=part, use_cache=False).logits
                            for part in ids.split(lengths, dim=1)], dim=1)
    assert_2x(got, want64, low, "packed logits (position_ids)")
    assert_2x(got_cu, want64, low, "packed logits (cu_seq_lens)")
    # without packing the same row would mix the sequences: the comparison can fail
    with torch.no_grad():
        unpacked = ours(input_ids=ids, use_cache=False).logits
    assert (unpacked - want64).abs().max() > 1e-2


@pytest.mark.slow
def test_gemma2_packed_gradients_match_eager():
    lengths = [6, 5]
    ids = _ids(1, 11, 64, 4)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    _compare_logits_and_grads(tiny_gemma2(seed=3), torch.ones(1, 11), input_ids=ids, position_ids=pos,
                              use_cache=False)


@pytest.mark.slow
def test_gemma2_training_loss_and_gradients_match_eager():
    ids, mask = _padded_batch()
    labels = ids.clone()
    labels[1, :4] = -100  # left padding: pads and the first real token (which a pad position would predict)
    eager, eager64, ours = _three(tiny_gemma2(seed=1))
    for m in (eager, eager64, ours):
        m.train()
    apply_to(ours)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    out, gw = _loss_and_grads(ours, **inputs)
    assert out.logits is None  # the fused loss never builds the (B, L, V) logits
    low, gw_low = _loss_and_grads(eager, **inputs)
    want64, gw64 = _loss_and_grads(eager64, **inputs)
    assert_2x(out.loss.detach(), want64.loss.detach(), low.loss.detach(), "loss")
    assert set(gw) == set(gw64)
    for n in gw64:
        assert_2x(gw[n], gw64[n], gw_low[n], f"grad {n}")
    # transformers' gradient-accumulation normalisation: sum / num_items_in_batch
    n_items = torch.tensor(50)
    ours_sum = ours(**inputs, num_items_in_batch=n_items).loss
    eager_sum = eager(**inputs, num_items_in_batch=n_items).loss
    assert abs(ours_sum.item() - eager_sum.item()) <= 1e-5 * abs(eager_sum.item())
    assert abs(ours_sum.item() - out.loss.item()) > 1e-3  # a different normalisation, really applied


@pytest.mark.slow
def test_gemma2_20_training_steps_match_eager_loss():
    eager = tiny_gemma2(seed=4)
    ours = copy.deepcopy(eager)
    apply_to(ours)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (eager, ours)]
    losses = {0: [], 1: []}
    for step in range(20):
        ids = _ids(2, 8, 64, 100 + step % 2)  # two batches in turn: memorised, so the loss falls
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0  # right padding (window 5 < 8 tokens)
        labels = ids.masked_fill(mask == 0, -100)
        for i, (m, opt) in enumerate(zip((eager, ours), opts)):
            m.train()
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    diffs = [abs(a - b) for a, b in zip(losses[0], losses[1])]
    assert max(diffs) <= 1e-5, diffs
    assert losses[0][-1] < losses[0][0] - 0.5  # it trains: the comparison covers moving weights


def test_remove_from_restores_the_exact_model():
    model = tiny_gemma2(seed=5)
    twin = Gemma2ForCausalLM(model.config).eval()  # transformers shares the config object between the two
    twin.load_state_dict(model.state_dict())
    assert twin.config is model.config
    ids, mask = _padded_batch()

    def state(m):
        return [(n, "forward" in mod.__dict__, mod.__dict__.get("forward"), mod.__dict__.get("config"))
                for n, mod in m.named_modules()]

    before, params = state(model), {k: v.clone() for k, v in model.state_dict().items()}
    twin_before = state(twin)
    with torch.no_grad():
        eager_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    apply_to(model)
    assert state(model) != before
    assert twin.config._attn_implementation == "eager" and state(twin) == twin_before  # instances only
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(twin(input_ids=ids, attention_mask=mask, use_cache=False).logits, eager_logits)
    assert not torch.equal(patched, eager_logits)  # the kernels really ran (rounding differs)
    remove_from(model)
    assert state(model) == before
    assert model.state_dict().keys() == params.keys()
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, eager_logits)
    # and a second round trip works the same
    apply_to(model, rms_norm=False)
    remove_from(model)
    assert state(model) == before


def test_remove_from_keeps_an_earlier_instance_forward():
    model = tiny_gemma2()
    norm = model.model.norm
    mine = norm.forward  # a bound method: store it as an instance forward of our own

    def custom(x):
        return mine(x)
    norm.forward = custom
    apply_to(model, attention=False, mlp=False, loss=False)
    assert norm.__dict__["forward"] is not custom
    remove_from(model)
    assert norm.__dict__["forward"] is custom


def test_unknown_architecture_and_double_patching_are_refused():
    with pytest.raises(TypeError, match="Linear is not a supported architecture"):
        apply_to(nn.Linear(3, 3))
    model = tiny_gemma2()
    with pytest.raises(ValueError, match="was not patched"):
        remove_from(model)
    apply_to(model)
    with pytest.raises(ValueError, match="Gemma2ForCausalLM is already patched"):
        apply_to(model)
    remove_from(model)


def test_a_failed_apply_leaves_the_model_untouched(monkeypatch):
    from florenz_kernels.integrations import models

    model = tiny_gemma2()
    before = [(n, dict(m.__dict__).get("forward"), m.__dict__.get("config")) for n, m in model.named_modules()]

    def boom(_original):
        raise RuntimeError("boom")
    monkeypatch.setattr(models, "_gemma2_causal_lm_forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        apply_to(model)
    assert [(n, dict(m.__dict__).get("forward"), m.__dict__.get("config")) for n, m in model.named_modules()] == before
    assert "_florenz_integration" not in model.__dict__


def test_mlp_with_another_activation_is_skipped_with_a_reason():
    model = tiny_gemma2(hidden_activation="gelu")  # exact erf GELU: not what the fused GeGLU computes
    record = apply_to(model, attention=False, rms_norm=False, loss=False)
    assert record.mlp == [] and "'gelu' is not the tanh GELU" in record.skipped["mlp"]
    remove_from(model)


class _Wrapper(nn.Module):
    """A user's own model around a Gemma-2 decoder (the 'Gemma-2 decoder inside another model' case)."""

    def __init__(self, cfg):
        super().__init__()
        self.decoder = Gemma2Model(cfg)
        self.head = nn.Linear(cfg.hidden_size, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state)


@pytest.mark.slow
def test_gemma2_decoder_inside_another_model():
    model = _Wrapper(gemma2_config()).eval()
    randomize_(model, 6)
    eager, eager64, ours = _three(model)
    record = apply_to(ours)
    assert record.architecture == "_Wrapper" and len(record.attention) == 2 and len(record.mlp) == 2
    assert record.loss == [] and "_Wrapper computes its own loss" in record.skipped["loss"]
    ids, mask = _padded_batch()
    g = torch.randn(2, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * mask[..., None]
    outs = []
    for m in (ours, eager, eager64):
        m.zero_grad()
        y = m(ids, mask)
        (y.double() * g).sum().backward()
        outs.append((y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (got, gw), (low, gw_low), (want, gw64) = outs
    real = mask.bool()
    assert_2x(got[real], want[real], low[real], "wrapper output")
    for n in gw64:
        assert_2x(gw[n], gw64[n], gw_low[n], f"grad {n}")
    remove_from(ours)


# ---- Florence2ForConditionalGeneration --------------------------------------------------------------------------


def _florence_inputs():
    n_img = 5  # 64 x 64 pixels -> a 2 x 2 map + the mean token (tiny DaViT: stride 32)
    prompt = _ids(2, 6, 95, 10)
    ids = torch.cat([torch.full((2, n_img), 95), prompt], dim=1)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # right padding of the second prompt
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    dec = _ids(2, 7, 95, 12)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, decoder_input_ids=dec,
                decoder_attention_mask=dec_mask)


def test_florence2_record():
    model = tiny_florence2()
    record = apply_to(model)
    # encoder self-attention, decoder self- and cross-attention; the vision tower is not touched
    assert record.attention == ["model.language_model.encoder.layers.0.self_attn",
                                "model.language_model.decoder.layers.0.self_attn",
                                "model.language_model.decoder.layers.0.encoder_attn"]
    assert record.loss == [""] and record.rms_norm == [] and record.mlp == []
    assert "LayerNorm" in record.skipped["rms_norm"] and "fc1" in record.skipped["mlp"]
    assert model.model.vision_tower.config._attn_implementation == "eager"
    remove_from(model)
    assert model.model.language_model.config is model.config.text_config


@pytest.mark.slow
def test_florence2_logits_gradients_and_loss_match_eager():
    inputs = _florence_inputs()
    rows = inputs["decoder_attention_mask"]
    _compare_logits_and_grads(tiny_florence2(seed=1), rows, **inputs)
    eager, eager64, ours = _three(tiny_florence2(seed=2))
    for m in (eager, eager64, ours):
        m.train()
    apply_to(ours)
    labels = inputs.pop("decoder_input_ids").masked_fill(rows == 0, -100)
    inputs = dict(inputs, labels=labels)
    out, gw = _loss_and_grads(ours, **inputs)
    assert out.logits is None
    low, gw_low = _loss_and_grads(eager, **inputs)
    want, gw64 = _loss_and_grads(eager64, **_as(inputs, torch.float64))
    assert_2x(out.loss.detach(), want.loss.detach(), low.loss.detach(), "loss")
    for n in gw64:
        assert_2x(gw[n], gw64[n], gw_low[n], f"grad {n}")


@pytest.mark.slow
def test_florence2_attention_dropout_falls_back_to_the_reference():
    # BART's attention dropout in training: the kernel has none, so those calls run the torch reference, which
    # draws the same dropout masks as transformers' eager attention (same shapes, same order): equal losses
    inputs = _florence_inputs()
    labels = inputs.pop("decoder_input_ids")
    eager = tiny_florence2(seed=3, attention_dropout=0.3).train()
    ours = copy.deepcopy(eager)
    apply_to(ours)
    torch.manual_seed(0)
    want = eager(**inputs, labels=labels).loss
    torch.manual_seed(0)
    got = ours(**inputs, labels=labels).loss
    torch.manual_seed(1)
    other = eager(**inputs, labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert abs(other.item() - want.item()) > 1e-4  # dropout really is on
