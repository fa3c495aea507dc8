"""The encoder-decoder pieces, fused: packed cross-attention, the all-layer cross K/V projection, the image-token
projection (florenz_kernels.image_tokens), and the whole model with the `triton` backend vs the reference.

CPU: Triton interpreter (tests/helpers/triton_interpreter.py), fp32 and fp16. The error rule is the attention
kernel's (tests/helpers/softcap_cases.py): max error vs float64 within 2x that of the reference run in the same
precision, plus 32 fp32 ulps at the tensor's scale (tests/helpers/softcap_cases.assert_within_2x says why).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from florenz_fast import ops
from florenz_fast.config import get_config
from florenz_fast.florenz import Florenz
from florenz_fast.modules import project_kv_all_layers
from florenz_fast.vision import ImageTokenProjector
from florenz_kernels import image_tokens as it
from florenz_kernels import softcap_attention as sa
from tests.helpers import error_rule
from tests.helpers.builders import tiny_model as _model
from tests.helpers.builders import tiny_sample as _sample
from tests.helpers.ci import skip_or_fail
from tests.helpers.softcap_cases import assert_within_2x, check_case
from tests.helpers.softcap_cases import kpm_holes as _kpm
from tests.helpers.static_reports import compile_reports
from tests.helpers.triton_interpreter import DEVICE  # (first: switches the interpreter on)

if DEVICE == "cpu" and not sa.INTERPRET:
    skip_or_fail("florenz_kernels was imported without TRITON_INTERPRET=1 before this module")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- cross-attention: decoder queries vs encoder keys, block-diagonal when packed ----------------------------

# Packed rows: decoder segments of length 1 next to longer ones, encoder segments of 1, 50 (a 224 px image) and
# 577 (768 px) tokens; GQA; softcap 50 as in Florenz; head dims 32 and 256 (Gemma-2).
CROSS = {
    "packed_ragged_gqa2": dict(H=4, Hk=2, D=32, lengths=[1, 9, 1, 30, 4], lengths_k=[50, 1, 577, 13, 1],
                               causal=False, softcap=50.0, scale=0.5),
    "packed_D256_gqa2": dict(H=4, Hk=2, D=256, lengths=[1, 3, 2], lengths_k=[577, 1, 50], causal=False,
                             softcap=50.0),
    "packed_gqa4_one_query_each": dict(H=8, Hk=2, D=64, lengths=[1, 1, 1, 1], lengths_k=[1, 577, 2, 50],
                                       causal=False, softcap=50.0, scale=0.5),
    "padded_mask_gqa2": dict(B=3, H=4, Hk=2, L=5, S=60, D=64, causal=False, softcap=50.0, scale=0.5, kpm="holes"),
}


@pytest.mark.parametrize("name", list(CROSS))
def test_cross_attention_fp32(name):
    check_case(_kpm(CROSS[name]), torch.float32)


@pytest.mark.parametrize("name", ["packed_ragged_gqa2", "packed_D256_gqa2", "padded_mask_gqa2"])
def test_cross_attention_fp16(name):
    check_case(_kpm(CROSS[name]), torch.float16)


# ---- all-layer cross K/V projection ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
def test_all_layer_projection_equals_per_layer_projections(preset):
    torch.manual_seed(0)
    decoder = Florenz(get_config(preset)).decoder
    for layer in decoder.layers:  # BART's k/v biases start at 0: make them matter
        for lin in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj):
            if lin.bias is not None:
                torch.nn.init.normal_(lin.bias)
    enc = torch.randn(2, 7, decoder.cfg.encoder_width, requires_grad=True)
    g = [(torch.randn(2, 7, a.k_proj.out_features), torch.randn(2, 7, a.v_proj.out_features))
         for a in (layer.encoder_attn for layer in decoder.layers)]

    def run(fused):
        decoder.zero_grad()
        enc.grad = None
        if fused:
            kv = decoder.cross_kv(enc)
        else:
            kv = [(layer.encoder_attn.k_proj(enc), layer.encoder_attn.v_proj(enc)) for layer in decoder.layers]
        sum(((k * gk).sum() + (v * gv).sum()) for (k, v), (gk, gv) in zip(kv, g)).backward()
        grads = {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}
        return kv, grads, enc.grad.clone()

    kv_f, grads_f, denc_f = run(True)
    kv_s, grads_s, denc_s = run(False)
    assert len(kv_f) == len(decoder.layers)
    for (kf, vf), (ks, vs) in zip(kv_f, kv_s):
        assert kf.shape == ks.shape and vf.shape == vs.shape
        torch.testing.assert_close(kf, ks, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vf, vs, rtol=1e-6, atol=1e-6)
    assert set(grads_f) == set(grads_s) and any("k_proj" in n for n in grads_f)
    for n in grads_s:
        torch.testing.assert_close(grads_f[n], grads_s[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(denc_f, denc_s, rtol=1e-5, atol=1e-6)
    # one (B, S, layers * 2 * width) tensor underneath: every token's K and V for all layers in one row
    assert kv_f[0][0].untyped_storage().data_ptr() == kv_f[-1][1].untyped_storage().data_ptr()


def test_project_kv_all_layers_is_one_gemm():
    attns = [torch.nn.ModuleDict(dict(k_proj=torch.nn.Linear(5, 4, bias=False), v_proj=torch.nn.Linear(5, 4,
                                                                                                       bias=False)))
             for _ in range(3)]
    calls = []
    real_linear = torch.nn.functional.linear

    def counting_linear(*args, **kwargs):
        calls.append(args[1].shape)
        return real_linear(*args, **kwargs)

    torch.nn.functional.linear = counting_linear
    try:
        project_kv_all_layers(torch.randn(2, 3, 5), attns)
    finally:
        torch.nn.functional.linear = real_linear
    assert calls == [torch.Size([24, 5])]


@pytest.mark.parametrize("preset", ["tiny", "tiny-bart"])
def test_model_with_fused_projection_equals_per_layer(preset):
    model = _model(preset)
    cfg = model.cfg
    samples = [_sample(cfg, 6, 5, 4), _sample(cfg, 10, 12, 5)]
    pixels = torch.cat([s[0] for s in samples])
    prompt = torch.cat([s[1] for s in samples], dim=1)
    dec = torch.cat([s[2] for s in samples], dim=1)
    cu = lambda lens: ops.cu_seqlens_from_lengths(lens)
    kw = dict(prompt_cu_seqlens=cu([6, 10]), decoder_cu_seqlens=cu([5, 12]))
    results = []
    for fused in (True, False):
        model.decoder.fuse_cross_kv = fused
        model.zero_grad()
        out = model(pixels, prompt, dec, **kw).logits
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.grad is not None}))
    model.decoder.fuse_cross_kv = True
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for n, g in results[1][1].items():
        torch.testing.assert_close(results[0][1][n], g, rtol=1e-4, atol=1e-7, msg=n)


# ---- the image-token projection --------------------------------------------------------------------------------


def _projector(C, d, seed=0):
    cfg = get_config("tiny")
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dims=cfg.vision.dims[:-1] + (C,),
                                                              projection_dim=d, max_pos_embeddings=24))
    torch.manual_seed(seed)
    proj = ImageTokenProjector(cfg)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return proj


def _projector_run(proj, feats, g, backend, dtype):
    proj = proj.to(dtype)
    feats = feats.to(dtype).detach().requires_grad_()
    proj.zero_grad()
    ops.set_backend(backend)
    calls = []
    real = it.image_token_norm
    it.image_token_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        out = proj(feats)
    finally:
        ops.set_backend(None)
        it.image_token_norm = real
    fused = backend == "triton" and dtype != torch.float64 and ops.triton_runs_on(feats)
    assert len(calls) == int(fused), f"{backend}/{dtype}: the fused kernel ran {len(calls)} times"
    out.backward(g.to(out.dtype))
    grads = [feats.grad] + [p.grad for p in proj.parameters()]
    return [out.detach()] + grads


# 224 px (7 x 7 map -> 50 tokens) and 768 px (24 x 24 -> 577 tokens); widths: a power of two and an odd one
@pytest.mark.parametrize("side,C,d", [(7, 64, 96), (24, 32, 1024), (24, 48, 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_image_tokens_match_the_reference(side, C, d, dtype):
    proj = _projector(C, d)
    gen = torch.Generator().manual_seed(1)
    # DaViT hands over a (B, C, H, W) view of (B, N, C) memory; build it the same way
    feats = torch.randn(2, side * side, C, generator=gen).transpose(1, 2).reshape(2, C, side, side)
    g = torch.randn(2, side * side + 1, d, generator=gen)
    ours = _projector_run(proj, feats, g, "triton", dtype)
    ref64 = _projector_run(proj, feats, g, "torch", torch.float64)
    low = _projector_run(proj, feats, g, "torch", dtype)
    names = ["out", "dfeats"] + [n for n, _ in proj.named_parameters()]
    assert ours[0].shape == (2, side * side + 1, d) and ours[0].dtype == dtype
    for name, a, r, lo in zip(names, ours, ref64, low):
        if r is None:  # the temporal table is a buffer, the projection has no bias
            continue
        if dtype == torch.float16 and name != "out":
            # fp16 gradients: the reference runs its LayerNorm backward in fp16 too; hold ours to 4x its error
            err = (a.double() - r).abs().max().item()
            assert err <= 4 * (lo.double() - r).abs().max().item() + 1e-3 * r.abs().max().item(), (name, err)
            continue
        assert_within_2x(a.to(r.device), r, lo, f"{name} {dtype}")


def test_kernel_module_reference_is_the_model_path():
    proj = _projector(40, 24).double()
    feats = torch.randn(2, 40, 5, 5, dtype=torch.float64)
    want = proj(feats)  # the `torch` backend (default)
    pos = proj.image_position_embed(5, 5).reshape(25, 40) + proj.visual_temporal_embed.pos_idx_to_embed[0]
    norm = proj.image_proj_norm
    got = it.image_tokens_reference(feats.flatten(2).transpose(1, 2), pos.double(), proj.image_projection.weight,
                                    norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_image_tokens_inputs_checked():
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, N, C\), pos \(N, C\) and weight \(d, C\)"):
        it.image_tokens(x, torch.randn(5, 8), torch.randn(6, 8), torch.ones(6), torch.zeros(6))
    with pytest.raises(ValueError, match=r"LayerNorm weight/bias must be \(6,\)"):
        it.image_tokens(x, torch.randn(4, 8), torch.randn(6, 8), torch.ones(5), torch.zeros(6))
    with pytest.raises(ValueError, match="N = 0"):
        it.image_tokens(torch.randn(2, 0, 8), torch.randn(0, 8), torch.randn(6, 8), torch.ones(6), torch.zeros(6))


def test_image_token_norm_opcheck():
    P = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    posb = torch.randn(9, 24, device=DEVICE, requires_grad=True)
    w, b = (torch.randn(24, device=DEVICE, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.florenz.image_token_norm.default, (P, posb, w, b, 1e-5))


# ---- the whole model: triton backend (every fused kernel) vs the reference -----------------------------------


def _model_run(model, batch, dtype, backend):
    model = model.to(dtype)
    model.zero_grad()
    ops.set_backend(backend)
    try:
        pixels, prompt, dec, kw = batch
        out = model(pixels.to(dtype), prompt, dec, **kw).logits
        out.float().square().mean().backward()
    finally:
        ops.set_backend(None)
    return [out.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_whole_model_triton_equals_torch(layout):
    model = _model("tiny")
    cfg = model.cfg
    samples = [_sample(cfg, 6, 5, 4), _sample(cfg, 10, 12, 5), _sample(cfg, 2, 1, 6)]
    pixels = torch.cat([s[0] for s in samples])
    if layout == "packed":
        kw = dict(prompt_cu_seqlens=ops.cu_seqlens_from_lengths([s[1].shape[1] for s in samples]),
                  decoder_cu_seqlens=ops.cu_seqlens_from_lengths([s[2].shape[1] for s in samples]))
        batch = (pixels, torch.cat([s[1] for s in samples], 1), torch.cat([s[2] for s in samples], 1), kw)
    else:
        def pad(t, n, v):
            return torch.cat([t, torch.full((1, n - t.shape[1]), v, dtype=t.dtype)], 1)

        prompt = torch.cat([pad(s[1], 10, cfg.encoder.pad_id) for s in samples])
        dec = torch.cat([pad(s[2], 12, 0) for s in samples])
        kw = dict(attention_mask=torch.cat([pad(torch.ones_like(s[1], dtype=torch.bool), 10, False)
                                            for s in samples]),
                  decoder_attention_mask=torch.cat([pad(torch.ones_like(s[2], dtype=torch.bool), 12, False)
                                                    for s in samples]))
        batch = (pixels, prompt, dec, kw)
    ours = _model_run(model, batch, torch.float32, "triton")
    ref64 = _model_run(model, batch, torch.float64, "torch")
    low = _model_run(model, batch, torch.float32, "torch")
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    checked = 0
    for name, a, r, lo in zip(names, ours, ref64, low):
        if r is None:
            continue
        assert_within_2x(a, r, lo, name)
        checked += 1
    assert checked > 50


# ---- static checks: the image-token kernels compile for sm_80 / sm_90 without spills --------------------------

_STATIC = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import torch
from florenz_kernels import image_tokens as it
out = []
for kind in ("rows_fwd", "mean_fwd", "mean_bwd", "rows_bwd"):
    for width in (768, 1024, 2048):
        for dt in (torch.bfloat16, torch.float32):
            for cap in ((8, 0), (9, 0)):
                r = it.static_resource_report(kind, width, dt, cap)
                r.pop("raw")
                out.append(r)
print(json.dumps(out))
"""


def test_static_image_token_kernels_compile_without_spills():
    reports = compile_reports(_STATIC, timeout=900)
    assert len(reports) == 4 * 3 * 2 * 2
    assert {(r["kind"], r["width"], r["dtype"], r["sm"]) for r in reports} == {
        (k, w, t, s) for k in ("rows_fwd", "mean_fwd", "mean_bwd", "rows_bwd") for w in (768, 1024, 2048)
        for t in ("bf16", "fp32") for s in (80, 90)}
    bad = [(r["kind"], r["width"], r["dtype"], r["sm"], r["stack"], r["local"], r["spill_insts"]) for r in reports
           if r["stack"] or r["local"] or r["spill_insts"]]
    assert not bad, f"kernels that spill (kind, width, dtype, sm, STACK, LOCAL, LDL/STL): {bad}"


# ---- GPU (skipped without CUDA) ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("side", [7, 24])
def test_gpu_image_tokens_bf16(side):
    proj = _projector(2048, 1024).cuda()
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(8, side * side, 2048, generator=gen).transpose(1, 2).reshape(8, 2048, side, side).cuda()
    g = torch.randn(8, side * side + 1, 1024, generator=gen).cuda()
    ours = _projector_run(proj, feats, g, "triton", torch.bfloat16)
    ref64 = _projector_run(proj, feats, g, "torch", torch.float64)
    low = _projector_run(proj, feats, g, "torch", torch.bfloat16)
    for name, a, r, lo in zip(["out", "dfeats"] + [n for n, _ in proj.named_parameters()], ours, ref64, low):
        if r is not None:
            error_rule.assert_within_2x(a, r, lo, name, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CROSS))
def test_gpu_cross_attention_bf16(name):
    c = dict(CROSS[name], D=256, H=8, Hk=4, scale=256 ** -0.5)
    if "lengths" not in c:
        c.update(L=300, S=577)
    check_case(_kpm(c), torch.bfloat16, device="cuda")
