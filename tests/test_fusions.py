"""Decoder fusions (florenz_kernels: linear_cross_entropy, rms_norm, geglu, rope) against float64 references.

CPU: the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/helpers/triton_interpreter.py before
the kernel modules are imported), fp32 and fp16 (the interpreter's bf16 tl.dot is wrong; none of these kernels dot,
but we keep to the rule). GPU tests (marked `gpu`) run bf16 at Gemma-2 sizes.

Rule (DESIGN.md 3): max error vs the float64 reference within 2x the max error of the same reference run in
the kernel's dtype, plus 4 fp32 ulps at the tensor's scale (only matters in fp32, where both sit at rounding
level); a one-element result (d scale) also gets one ulp of its own dtype (its final rounding).
"""

from __future__ import annotations

import pytest
import torch

from florenz_fast import ops
from florenz_fast.ops import registry
from florenz_kernels import geglu as gg
from florenz_kernels import linear_cross_entropy as lce
from florenz_kernels import rms_norm as rn
from florenz_kernels import rope as rp
from tests.helpers import error_rule
from tests.helpers.ci import skip_or_fail
from tests.helpers.static_reports import compile_reports
from tests.helpers.triton_interpreter import DEVICE  # (first: switches the interpreter on)

if DEVICE == "cpu" and not lce.INTERPRET:
    skip_or_fail("florenz_kernels were imported without TRITON_INTERPRET=1 before this module")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _randn(*shape, seed, dtype=torch.float32, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_within_2x(ours, ref64, ref_low, what=""):
    # 4 fp32 ulps: these ops sum over one row (a norm, a vocab chunk) in an order close to the reference's
    error_rule.assert_within_2x(ours, ref64, ref_low, what, ulps=4)


def _grads(fn, inputs, grad_outs):
    """Outputs and input gradients of fn(*inputs) for the given output gradients (inputs cloned as leaves)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,)) if o is not None]
    diff = [x for x in leaves if x is not None and x.requires_grad]
    gs = torch.autograd.grad(outs, diff, [g.to(device=o.device, dtype=o.dtype).reshape(o.shape)
                                         for o, g in zip(outs, grad_outs)])
    return [o.detach() for o in outs], list(gs)


def check_fn(kernel, reference, inputs, grad_outs, what):
    """kernel in the inputs' dtypes vs reference in float64 and in the same dtypes."""
    ours, g_ours = _grads(kernel, inputs, grad_outs)
    to64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    ref64, g64 = _grads(reference, to64, grad_outs)
    low, g_low = _grads(reference, inputs, grad_outs)
    for i, (a, b, c) in enumerate(zip(ours + g_ours, ref64 + g64, low + g_low)):
        assert_within_2x(a, b, c, f"{what} [{i}]")


# ---- fused linear cross-entropy -------------------------------------------------------------------------------


def _ce_case(T=37, D=16, V=203, dtype=torch.float32, ignore_every=3, seed=0):
    h = _randn(T, D, seed=seed, dtype=dtype, scale=2.0)
    w = _randn(V, D, seed=seed + 1, dtype=dtype)
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
    if ignore_every:
        labels[::ignore_every] = -100
    return h, w, labels


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap,z_loss", [(30.0, 0.0), (30.0, 1e-3), (0.0, 0.0), (2.0, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_matches_reference(dtype, softcap, z_loss, reduction):
    # V = 203 is not a multiple of the vocabulary block (64 in the interpreter), T = 37 not of the chunk (8);
    # softcap 2 puts most logits on the flat part of tanh
    h, w, labels = _ce_case(dtype=dtype)
    kw = dict(softcap=softcap, z_loss=z_loss, reduction=reduction)
    g = _randn(37 if reduction == "none" else 1, seed=9).abs() + 0.5  # reshaped to the output's shape
    check_fn(lambda h, w: lce.linear_cross_entropy(h, w, labels, chunk_size=8, **kw),
             lambda h, w: lce.linear_cross_entropy_reference(h, w, labels, **kw), [h, w], [g],
             f"{dtype} {kw}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_cpu_torch_rows_path(monkeypatch, reduction):
    """The path of a CPU without the interpreter (torch ops for the per-row part) meets the same rule."""
    monkeypatch.setattr(lce, "_use_triton", lambda t: False)
    h, w, labels = _ce_case()
    kw = dict(softcap=30.0, z_loss=1e-3, reduction=reduction)
    g = _randn(37 if reduction == "none" else 1, seed=9).abs() + 0.5
    check_fn(lambda h, w: lce.linear_cross_entropy(h, w, labels, chunk_size=8, **kw),
             lambda h, w: lce.linear_cross_entropy_reference(h, w, labels, **kw), [h, w], [g], "torch rows")


@pytest.mark.parametrize("rows", ["triton", "torch"])
def test_linear_ce_sum_and_token_losses(monkeypatch, rows):
    """"sum+none": the sum (gradients from the forward, 3 matmuls) and the per-token losses without gradient, as
    the training loop uses them; the same values and gradients as the reference's, with no read back."""
    from tests.helpers.sync_guard import no_device_host_reads

    if rows == "torch":  # a CPU without the interpreter: torch ops for the per-row part
        monkeypatch.setattr(lce, "_use_triton", lambda t: False)
    h, w, labels = _ce_case(T=19, V=70)
    h, w = h.requires_grad_(), w.requires_grad_()
    with no_device_host_reads():
        total, tok = lce.linear_cross_entropy(h, w, labels, reduction="sum+none", chunk_size=4, check_labels=False)
        dh, dw = torch.autograd.grad(total * 0.25, (h, w))
    assert not tok.requires_grad and tok.shape == labels.shape
    ref_total, ref_tok = lce.linear_cross_entropy_reference(h, w, labels, reduction="sum+none")
    assert not ref_tok.requires_grad
    rdh, rdw = torch.autograd.grad(ref_total * 0.25, (h, w))
    torch.testing.assert_close((total, tok, dh, dw), (ref_total, ref_tok, rdh, rdw), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tok.sum(), total, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="sum\\+none, got 'total'"):
        lce.linear_cross_entropy(h, w, labels, reduction="total")


@pytest.mark.slow
def test_linear_ce_all_labels_ignored():
    h, w, labels = _ce_case()
    labels[:] = -100
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = lce.linear_cross_entropy(hh, ww, labels, chunk_size=8)
    assert torch.isnan(loss)  # mean over zero tokens, as torch's cross_entropy
    total = lce.linear_cross_entropy(hh, ww, labels, reduction="sum", chunk_size=8)
    assert total.item() == 0.0
    total.backward()
    assert hh.grad.abs().max().item() == 0.0 and ww.grad.abs().max().item() == 0.0
    tok = lce.linear_cross_entropy(h, w, labels, reduction="none")
    assert tok.abs().max().item() == 0.0


@pytest.mark.slow
def test_linear_ce_ignored_tokens_get_no_gradient_and_no_loss():
    h, w, labels = _ce_case(ignore_every=2)
    hh = h.clone().requires_grad_()
    tok = lce.linear_cross_entropy(hh, w, labels, reduction="none", chunk_size=5)
    tok.sum().backward()
    ignored = labels == -100
    assert tok[ignored].abs().max().item() == 0.0 and (tok[~ignored] > 0).all()
    assert hh.grad[ignored].abs().max().item() == 0.0 and hh.grad[~ignored].abs().max().item() > 0


@pytest.mark.slow
def test_linear_ce_non_uniform_token_weights_recompute():
    """A per-token gradient that differs between tokens cannot rescale the saved dW: the recompute path."""
    h, w, labels = _ce_case()
    weights = torch.linspace(0.1, 2.0, 37, device=DEVICE)
    check_fn(lambda h, w: (lce.linear_cross_entropy(h, w, labels, reduction="none", chunk_size=8) * weights).sum(),
             lambda h, w: (lce.linear_cross_entropy_reference(h, w, labels, reduction="none") * weights).sum(),
             [h, w], [torch.tensor(1.0)], "weighted")


def test_linear_ce_leading_dims_and_bad_input():
    h, w, labels = _ce_case(T=12)
    a = lce.linear_cross_entropy(h.view(3, 4, -1), w, labels.view(3, 4), reduction="none")
    assert a.shape == (3, 4)
    with pytest.raises(ValueError, match="labels outside"):
        lce.linear_cross_entropy(h, w, torch.full_like(labels, 203))
    with pytest.raises(ValueError, match=r"must share D"):
        lce.linear_cross_entropy(h, w[:, :5], labels)
    with pytest.raises(ValueError, match=r"labels \(11,\) must match"):
        lce.linear_cross_entropy(h, w, labels[:11])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_ce_reads_nothing_back(reduction):
    """Forward and backward make no device->host read (DESIGN.md 13) once the labels are checked on the host;
    the check itself is one read (the guard can fail), and the gradients still match the reference."""
    from tests.helpers.sync_guard import DeviceHostRead, no_device_host_reads

    h, w, labels = _ce_case(T=9, V=50)
    h, w = h.requires_grad_(), w.requires_grad_()
    weights = torch.linspace(0.5, 2.0, 9)  # a non-uniform per-token gradient for "none"

    def loss_of(out):  # "none": a non-uniform gradient, then (below) the expanded one of a mean
        return (out * weights).sum() if reduction == "none" else out * 3.0

    with no_device_host_reads():
        loss = loss_of(lce.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=4, check_labels=False))
        dh, dw = torch.autograd.grad(loss, (h, w))
    ref = loss_of(lce.linear_cross_entropy_reference(h, w, labels, reduction=reduction))
    rdh, rdw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close((loss, dh, dw), (ref, rdh, rdw), rtol=1e-4, atol=1e-5)
    if reduction == "none":  # the gradient of tok.sum() / n arrives as an expanded (stride 0) tensor
        got = torch.autograd.grad(lce.linear_cross_entropy(h, w, labels, reduction="none", chunk_size=4,
                                                           check_labels=False).sum() / 7, (h, w))
        want = torch.autograd.grad(lce.linear_cross_entropy_reference(h, w, labels, reduction="none").sum() / 7, (h, w))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(DeviceHostRead, match=r"Tensor.__bool__"):  # the check, inside the custom op
        with no_device_host_reads():
            lce.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_size=4)


def test_linear_ce_opcheck():
    h, w, labels = _ce_case(T=9, V=50)
    h, w = h.requires_grad_(), w.requires_grad_()
    for grad_in_forward in (True, False):  # "sum" / "mean" (saved gradients) and "none" (recomputed)
        torch.library.opcheck(torch.ops.florenz.linear_cross_entropy_fwd.default,
                              (h, w, labels, None, 30.0, -100, 0.0, 4, True, True, grad_in_forward, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.florenz.linear_cross_entropy_bwd.default,
                          (torch.rand(9), h.detach(), w.detach(), labels, 30.0, -100, 0.0, 4, True, True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_ops_backends_agree_on_the_loss():
    h, w, labels = _ce_case()
    a = ops.linear_cross_entropy(h, w, labels, softcap=30.0, reduction="none", backend="torch")
    b = ops.linear_cross_entropy(h, w, labels, softcap=30.0, reduction="none", backend="triton")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- RMSNorm (+ residual) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [37, 64])
@pytest.mark.parametrize("variant", ["plain", "add", "add_scale", "add_scale_next", "add_next"])
def test_rms_norm_matches_reference(dtype, D, variant):
    shape = (3, 7, D)
    x, y = _randn(*shape, seed=1, dtype=dtype), _randn(*shape, seed=2, dtype=dtype, scale=3.0)
    w, w2 = _randn(D, seed=3, scale=0.3), _randn(D, seed=4, scale=0.3)
    s = _randn(1, seed=5, dtype=dtype) * 0.5
    gs = [_randn(*shape, seed=6), _randn(*shape, seed=7)]
    if variant == "plain":
        check_fn(lambda y, w: rn.rms_norm(y, w, 1e-6), lambda y, w: rn.rms_norm_reference(y, w, 1e-6), [y, w],
                 gs[:1], f"{dtype} D={D} plain")
        return
    scale = s if "scale" in variant else None
    nxt = w2 if "next" in variant else None

    def run(f):
        def fn(x, y, w, s=None, w2=None):
            return f(x, y, w, 1e-6, scale=s, next_weight=w2)
        return fn

    check_fn(run(rn.add_rms_norm), run(rn.add_rms_norm_reference), [x, y, w, scale, nxt], gs,
             f"{dtype} D={D} {variant}")


def test_add_rms_norm_mixed_dtypes_as_under_autocast():
    """fp32 residual stream + fp16 projection output (autocast): h is fp32, the norm rounds to fp16 first."""
    x, y = _randn(5, 48, seed=1), _randn(5, 48, seed=2, dtype=torch.float16)
    w, w2, s = _randn(48, seed=3, scale=0.3), _randn(48, seed=4, scale=0.3), _randn(1, seed=5) * 0.5
    h, nxt = rn.add_rms_norm(x, y, w, 1e-6, scale=s, next_weight=w2)
    h_ref, nxt_ref = ops.add_rms_norm(x, y, w, 1e-6, scale=s, next_weight=w2, backend="torch")
    assert h.dtype == h_ref.dtype == torch.float32 and nxt.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=0, atol=2e-7)
    torch.testing.assert_close(nxt, nxt_ref, rtol=0, atol=1e-6)
    gs = [_randn(5, 48, seed=6), _randn(5, 48, seed=7)]
    check_fn(lambda x, y, w, s, w2: rn.add_rms_norm(x, y, w, 1e-6, scale=s, next_weight=w2),
             lambda x, y, w, s, w2: rn.add_rms_norm_reference(x, y, w, 1e-6, scale=s, next_weight=w2),
             [x, y, w, s, w2], gs, "mixed")


def test_rms_norm_reference_is_the_model_definition():
    y, w = _randn(4, 33, seed=1, dtype=torch.float16), _randn(33, seed=2)
    assert torch.equal(rn.rms_norm_reference(y, w, 1e-6), ops.rms_norm(y, w, 1e-6, backend="torch"))


def test_rms_norm_bad_input():
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        rn.rms_norm(torch.zeros(2, 8, device=DEVICE), torch.zeros(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        rn.rms_norm(torch.zeros(2, 8, dtype=torch.float64, device=DEVICE), torch.zeros(8, device=DEVICE), 1e-6)


# ---- GeGLU ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 37), (2, 300)])
def test_geglu_matches_reference(dtype, shape):
    g, u = _randn(*shape, seed=1, dtype=dtype, scale=2.5), _randn(*shape, seed=2, dtype=dtype)
    check_fn(gg.geglu, gg.geglu_reference, [g, u], [_randn(*shape, seed=3)], f"{dtype} {shape}")


def test_geglu_saves_only_its_inputs():
    g, u = _randn(4, 40, seed=1).requires_grad_(), _randn(4, 40, seed=2).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gg.geglu(g, u)
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {g.data_ptr(), u.data_ptr()}


# ---- RoPE ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,Hk,D", [(4, 2, 10), (3, 3, 16), (8, 1, 64)])
def test_rope_padded_views_match_reference(dtype, H, Hk, D):
    B, L = 2, 7
    qp, kp = _randn(B, L, H * D, seed=1, dtype=dtype), _randn(B, L, Hk * D, seed=2, dtype=dtype)
    cos, sin = rp.rope_tables(torch.arange(L, device=DEVICE)[None] + 1000, D, 10000.0)  # large angles too

    def run(f):
        def fn(qp, kp):  # the model's layout: (B, L, H*D) projection output viewed as (B, H, L, D)
            q = (qp * 1).view(B, L, H, D).transpose(1, 2)
            k = (kp * 1).view(B, L, Hk, D).transpose(1, 2)
            return f(q, k, cos.to(qp.dtype), sin.to(qp.dtype))
        return fn

    gs = [_randn(B, H, L, D, seed=3), _randn(B, Hk, L, D, seed=4)]
    check_fn(run(rp.rope_), run(rp.rope_reference), [qp, kp], gs, f"{dtype} H={H} Hk={Hk} D={D}")


def test_rope_packed_in_place_positions_from_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 4, 11], dtype=torch.int32, device=DEVICE)  # an empty and a length-1 segment
    pos = rp.positions_from_cu_seqlens(cu)
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6]
    cos, sin = rp.rope_tables(pos, 32)
    q, k = _randn(11, 4, 32, seed=1), _randn(11, 2, 32, seed=2)
    want = rp.rope_reference(q.double(), k.double(), cos.double(), sin.double())
    ptrs = (q.data_ptr(), k.data_ptr())
    out = rp.rope_(q, k, cos, sin)
    assert out[0] is q and out[1] is k and (q.data_ptr(), k.data_ptr()) == ptrs
    low = rp.rope_reference(*[t for t in (_randn(11, 4, 32, seed=1), _randn(11, 2, 32, seed=2))], cos, sin)
    for a, b, c in zip((q, k), want, low):
        assert_within_2x(a, b, c, "packed")


def test_rope_ops_backends_agree_with_model_tables():
    """ops.rope takes the model's duplicated (B, 1, L, D) tables (Rotary.cos_sin) on both backends."""
    from florenz_fast.gemma_decoder import Rotary

    rot = Rotary(16, 10000.0).to(DEVICE)
    cos, sin = rot.cos_sin(torch.arange(9, device=DEVICE)[None], torch.float32)
    q, k = _randn(1, 4, 9, 16, seed=1), _randn(1, 2, 9, 16, seed=2)
    a = ops.rope(q.clone(), k.clone(), cos, sin, backend="torch")
    b = ops.rope(q.clone(), k.clone(), cos, sin, backend="triton")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


# ---- the whole tiny model: triton backend (all fusions + attention kernel) == torch backend ---------------------


def _tiny_model_and_batch(packed: bool):
    from florenz_fast.config import get_config
    from florenz_fast.florenz import Florenz

    torch.manual_seed(0)
    model = Florenz(get_config("tiny")).to(DEVICE).eval()  # no dropout: runs must be comparable
    with torch.no_grad():  # non-trivial norms and gates so that every fused path matters
        for n, p in model.named_parameters():
            if n.endswith("encoder_attn_gate") or (n.startswith("decoder.") and n.endswith("norm.weight")):
                p.copy_(torch.randn_like(p) * 0.5)
    # frozen as in training (SPEC §7): its fp32 gradients are dominated by rounding noise (30 % off the float64
    # ones in the reference itself), and no fusion runs there
    model.vision_tower.requires_grad_(False)
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g).to(DEVICE)
    if packed:
        prompt = torch.randint(3, cfg.encoder.vocab_size, (1, 13), generator=g).to(DEVICE)
        dec = torch.randint(3, cfg.decoder.vocab_size, (1, 19), generator=g).to(DEVICE)
        labels = torch.randint(3, cfg.decoder.vocab_size, (1, 19), generator=g).to(DEVICE)
        labels[0, [4, 11, 18]] = -100
        kw = dict(prompt_cu_seqlens=ops.cu_seqlens_from_lengths([6, 7], DEVICE),
                  decoder_cu_seqlens=ops.cu_seqlens_from_lengths([8, 11], DEVICE))
    else:
        prompt = torch.randint(3, cfg.encoder.vocab_size, (2, 9), generator=g).to(DEVICE)
        dec = torch.randint(3, cfg.decoder.vocab_size, (2, 11), generator=g).to(DEVICE)
        labels = torch.randint(3, cfg.decoder.vocab_size, (2, 11), generator=g).to(DEVICE)
        labels[1, 6:] = -100
        mask = torch.ones_like(prompt, dtype=torch.bool)
        mask[1, 5:] = False
        dmask = labels != -100
        kw = dict(attention_mask=mask, decoder_attention_mask=dmask)
    return model, (pixels, prompt, dec), dict(kw, labels=labels)


@pytest.mark.slow
@pytest.mark.parametrize("packed,sum_loss", [(False, False), (True, False), (True, True)])
def test_tiny_model_triton_backend_equals_reference(packed, sum_loss):
    # sum_loss: the training loop's call (the gradient through the sum; token losses without it)
    model, args, kw = _tiny_model_and_batch(packed)

    def run(m, backend, dtype):
        m.zero_grad(set_to_none=True)
        prev = registry._default_backend
        ops.set_backend(backend)
        try:
            a = [t.to(dtype) if t.is_floating_point() else t for t in args]
            out = m(*a, **kw, return_logits=False, sum_loss=sum_loss)
            assert out.logits is None and out.token_losses.requires_grad != sum_loss
            out.loss.backward()
        finally:
            ops.set_backend(prev)
        return out.loss.detach(), out.token_losses.detach(), {n: p.grad.detach().clone() for n, p in
                                                            m.named_parameters() if p.grad is not None}

    ref64 = run(model.double(), "torch", torch.float64)
    model.float()
    ref32 = run(model, "torch", torch.float32)
    fused = run(model, "triton", torch.float32)
    assert_within_2x(fused[0], ref64[0], ref32[0], "loss")
    assert_within_2x(fused[1], ref64[1], ref32[1], "token losses")
    assert set(fused[2]) == set(ref64[2])
    for name in ref64[2]:
        assert_within_2x(fused[2][name], ref64[2][name], ref32[2][name], name)
    # and with the logits requested the loss is the same quantity
    ops.set_backend("triton")
    try:
        with torch.no_grad():
            out = model(*args, **kw)
    finally:
        ops.set_backend(None)
    assert out.logits is not None
    assert abs(out.loss.item() - ref32[0].item()) <= 1e-5


# ---- static GPU checks (no GPU): every kernel config compiles for sm_80 / sm_90 without spills --------------------

_STATIC_SCRIPT = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
from florenz_kernels import _static, linear_cross_entropy, rms_norm, geglu, rope
MODS = {"linear_cross_entropy": linear_cross_entropy, "rms_norm": rms_norm, "geglu": geglu, "rope": rope}

def one(job):
    mod, dt, cap, i = job
    c = MODS[mod].static_cases(dt)[i]
    arg_type = lambda n: ("*" + c["ptr_types"][n] if n in c["ptr_types"]  # noqa: E731
                          else "fp32" if n in c["float_args"] else "i32")
    r = _static.compile_report(c["fn"], c["constexprs"], arg_type, lambda n: n in c["ptr_types"], cap,
                               num_warps=c["num_warps"], num_stages=c.get("num_stages", 1))
    r.update(module=mod, dtype=dt, constexprs={k: v for k, v in c["constexprs"].items()})
    return r

jobs = [(m, dt, cap, i) for m in MODS for dt in ("bf16", "fp32") for cap in ((9, 0), (8, 0))
        for i in range(len(MODS[m].static_cases(dt)))]
"""


@pytest.fixture(scope="module")
def static_reports():
    return compile_reports(_STATIC_SCRIPT, pool=True)


@pytest.mark.slow
def test_static_every_kernel_compiles_for_sm80_and_sm90(static_reports):
    seen = {(r["module"], r["kernel"], r["dtype"], r["sm"]) for r in static_reports}
    want = {("linear_cross_entropy", "_ce_rows_kernel"), ("rms_norm", "_fwd_kernel"), ("rms_norm", "_bwd_kernel"),
            ("geglu", "_fwd_kernel"), ("geglu", "_bwd_kernel"), ("rope", "_rope_kernel")}
    assert seen == {(m, k, dt, sm) for m, k in want for dt in ("bf16", "fp32") for sm in (80, 90)}


@pytest.mark.slow
def test_static_no_register_spills_and_shared_memory_fits(static_reports):
    bad = [(r["module"], r["kernel"], r["dtype"], r["sm"], r["constexprs"], r["stack"], r["local"], r["spill_insts"])
           for r in static_reports if r["stack"] or r["local"] or r["spill_insts"]]
    assert not bad, f"configs that spill: {bad}"
    limit = {90: 232448, 80: 166912}
    assert all(r["shared"] <= limit[r["sm"]] for r in static_reports)


# ---- GPU (skipped without CUDA): bf16 at Gemma-2-2B sizes ---------------------------------------------------------


@pytest.mark.gpu
def test_gpu_linear_ce_bf16_gemma_vocab():
    torch.manual_seed(0)
    T, D, V = 1024, 2304, 256000
    h = (torch.randn(T, D, device="cuda") * 0.5).bfloat16()
    w = (torch.randn(V, D, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, V, (T,), device="cuda")
    labels[::7] = -100
    g = torch.tensor(1.0)
    # chunk 300: four chunks, fp32 dW accumulation across them
    check_fn(lambda h, w: lce.linear_cross_entropy(h, w, labels, chunk_size=300),
             lambda h, w: lce.linear_cross_entropy_reference(h, w, labels), [h, w], [g], "gpu bf16 loss")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_rms_geglu_rope(dtype):
    shape = (4, 257, 2304)
    x, y = _randn(*shape, seed=1, dtype=dtype), _randn(*shape, seed=2, dtype=dtype, scale=3.0)
    w, w2, s = _randn(2304, seed=3, scale=0.3), _randn(2304, seed=4, scale=0.3), _randn(1, seed=5, dtype=dtype)
    gs = [_randn(*shape, seed=6), _randn(*shape, seed=7)]
    check_fn(lambda x, y, w, s, w2: rn.add_rms_norm(x, y, w, 1e-6, scale=s, next_weight=w2),
             lambda x, y, w, s, w2: rn.add_rms_norm_reference(x, y, w, 1e-6, scale=s, next_weight=w2),
             [x, y, w, s, w2], gs, f"gpu add_rms_norm {dtype}")
    g, u = _randn(2, 300, 9216, seed=8, dtype=dtype, scale=2.0), _randn(2, 300, 9216, seed=9, dtype=dtype)
    check_fn(gg.geglu, gg.geglu_reference, [g, u], [_randn(2, 300, 9216, seed=10)], f"gpu geglu {dtype}")
    B, L, H, Hk, D = 2, 333, 8, 4, 256
    qp, kp = _randn(B, L, H * D, seed=11, dtype=dtype), _randn(B, L, Hk * D, seed=12, dtype=dtype)
    cos, sin = rp.rope_tables(torch.arange(L, device="cuda")[None] * 13, D, 10000.0)

    def run(f):
        def fn(qp, kp):
            return f((qp * 1).view(B, L, H, D).transpose(1, 2), (kp * 1).view(B, L, Hk, D).transpose(1, 2), cos, sin)
        return fn

    check_fn(run(rp.rope_), run(lambda q, k, c, s: rp.rope_reference(q, k, c.to(q.dtype), s.to(q.dtype))),
             [qp, kp], [_randn(B, H, L, D, seed=13), _randn(B, Hk, L, D, seed=14)], f"gpu rope {dtype}")


@pytest.mark.gpu
def test_gpu_tiny_model_triton_backend_equals_reference():
    test_tiny_model_triton_backend_equals_reference(packed=True)
