"""Decode-time ops of csrc/ (florenz::decode_attention, cross_decode_attention, rope_kv_append): the extension's CPU
implementation (ops backend `ext` on CPU tensors) against the float64 reference of florenz_fast.ops (backend `torch`),
input checks, and (marked gpu) the CUDA kernels (`ext` on CUDA tensors) against both. Skipped where the extension is
not built (a CPU-only torch); CI builds it (the Makefile set-up)."""

from __future__ import annotations

import pytest
import torch

from florenz_fast import ops
from tests.helpers import error_rule

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason=ops.extension_status()[1])

SCALE = 64 ** -0.5


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield


def rand(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def lowp_ok(got, ref_lowp, ref64):
    """flash-attention's rule: within 2x the error of the reference computed in the same low precision."""
    return error_rule.within_2x(got, ref64, ref_lowp, atol=1e-6)


# (H, Hk): GQA ratios 1, 2, 8
HEADS = [(2, 2), (4, 2), (8, 1)]


def make_decode(B, H, Hk, Lq, C, lens, D=64, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = rand(B, H, Lq, D, dtype=dtype, device=device, gen=g)
    k = rand(B, Hk, C, D, dtype=dtype, device=device, gen=g) * 2
    v = rand(B, Hk, C, D, dtype=dtype, device=device, gen=g)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device)


# (C, lens, window): a linear cache with ragged lengths (odd ones, one full), and a ring buffer that wrapped
LAYOUTS = {
    "linear": (97, [3, 7, 60, 97], 0),
    "linear-window": (97, [3, 7, 60, 97], 11),
    "ring": (13, [3, 13, 40, 257], 11),  # C = 13 >= window + Lq - 1 for Lq <= 3
}


@pytest.mark.parametrize("H,Hk", HEADS)
@pytest.mark.parametrize("Lq", [1, 3])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decode_cpu_matches_reference_fp64(H, Hk, Lq, layout):
    C, lens, window = LAYOUTS[layout]
    q, k, v, cl = make_decode(4, H, Hk, Lq, C, lens)
    got = ops.decode_attention(q, k, v, cl, scale=SCALE, softcap=5.0, window=window, backend="ext")
    want = ops.decode_attention_reference(q, k, v, cl, SCALE, 5.0, window)
    assert err(got, want) < 1e-12
    assert want.abs().sum() > 0


@pytest.mark.parametrize("Lq", [1, 3])
def test_ring_buffer_equals_windowed_attention_over_full_history(Lq):
    """The slot rule against an independent formulation: a ring cache holding the last positions of a long
    history gives the sliding-window causal attention of ops.attention over the whole history."""
    H, Hk, D, W, C, length = 4, 2, 64, 8, 10, 45  # C = W + Lq - 1 at most for Lq 3
    g = torch.Generator().manual_seed(3)
    q = rand(1, H, Lq, D, dtype=torch.float64, gen=g)
    k_full = rand(1, Hk, length, D, dtype=torch.float64, gen=g)
    v_full = rand(1, Hk, length, D, dtype=torch.float64, gen=g)
    k_ring = torch.zeros(1, Hk, C, D, dtype=torch.float64)
    v_ring = torch.zeros_like(k_ring)
    for p in range(length):  # position p lives in slot p % C
        k_ring[:, :, p % C] = k_full[:, :, p]
        v_ring[:, :, p % C] = v_full[:, :, p]
    cl = torch.tensor([length], dtype=torch.int32)
    got = ops.decode_attention(q, k_ring, v_ring, cl, scale=SCALE, softcap=3.0, window=W, backend="ext")
    want = ops.attention(q, k_full, v_full, scale=SCALE, softcap=3.0, causal=True, window=W, backend="torch")
    assert err(got, want) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_decode_cpu_low_precision(dtype):
    C, lens, window = LAYOUTS["ring"]
    q, k, v, cl = make_decode(4, 8, 4, 3, C, lens, dtype=dtype)
    got = ops.decode_attention(q, k, v, cl, scale=SCALE, softcap=5.0, window=window, backend="ext")
    assert got.dtype == dtype
    ref64 = ops.decode_attention_reference(q.double(), k.double(), v.double(), cl, SCALE, 5.0, window)
    ref_lowp = ops.decode_attention_reference(q, k, v, cl, SCALE, 5.0, window)
    assert lowp_ok(got, ref_lowp, ref64)


def test_decode_first_token_sees_only_itself():
    q, k, v, cl = make_decode(1, 2, 2, 1, 8, [1])
    out = ops.decode_attention(q, k, v, cl, scale=SCALE, softcap=0.0, window=0, backend="ext")
    assert err(out[0, :, 0], v[0, :, 0]) < 1e-12  # one visible key: weight 1 on slot 0


def make_cross(n_images, beams, S, lens, H, Hk, D=64, layers=3, layer=1, dtype=torch.float64, device="cpu"):
    """k, v as column slices of one (n_images, S, layers * 2 * Hk * D) tensor, as decoder.cross_kv produces."""
    g = torch.Generator().manual_seed(7)
    kv_all = rand(n_images, S, layers * 2 * Hk * D, dtype=dtype, device=device, gen=g)
    width = Hk * D
    k = kv_all[..., (2 * layer) * width:(2 * layer + 1) * width].unflatten(-1, (Hk, D))
    v = kv_all[..., (2 * layer + 1) * width:(2 * layer + 2) * width].unflatten(-1, (Hk, D))
    N = n_images * beams
    q = rand(N, H, 1, D, dtype=dtype, device=device, gen=g)
    index = torch.arange(n_images, dtype=torch.int32, device=device).repeat_interleave(beams)
    return q, k, v, index, torch.tensor(lens, dtype=torch.int32, device=device)


@pytest.mark.parametrize("H,Hk", HEADS)
@pytest.mark.parametrize("Lq", [1, 3])
def test_cross_cpu_beams_share_strided_cache(H, Hk, Lq):
    q, k, v, index, lens = make_cross(3, 4, 50, [50, 17, 1], H, Hk)
    assert not k.is_contiguous() and k.stride(-1) == 1
    q = q.expand(-1, -1, Lq, -1).contiguous() + rand(q.shape[0], H, Lq, q.shape[-1], dtype=q.dtype)
    got = ops.cross_decode_attention(q, k, v, index, lens, scale=SCALE, softcap=4.0, backend="ext")
    want = ops.cross_decode_attention_reference(q, k, v, index, lens, SCALE, 4.0)
    assert err(got, want) < 1e-12
    # beams of one image with the same query give the same output (they read one cache)
    same = ops.cross_decode_attention(q[:1].expand(4, -1, -1, -1), k, v, index[:4], lens, scale=SCALE,
                                      softcap=4.0, backend="ext")
    assert err(same, same[:1].expand_as(same)) == 0


def test_cross_cpu_zero_length_image_and_bf16():
    q, k, v, index, lens = make_cross(2, 2, 20, [0, 20], 4, 2, dtype=torch.bfloat16)
    got = ops.cross_decode_attention(q, k, v, index, lens, scale=SCALE, softcap=50.0, backend="ext")
    assert (got[:2] == 0).all()
    ref64 = ops.cross_decode_attention_reference(q.double(), k.double(), v.double(), index, lens, SCALE, 50.0)
    ref_lowp = ops.cross_decode_attention_reference(q, k, v, index, lens, SCALE, 50.0)
    assert lowp_ok(got, ref_lowp, ref64) and err(got[2:], ref64[2:]) > 0


def make_rope(B, H, Hk, Lq, C, lens, D=64, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(11)
    q = rand(B, H, Lq, D, dtype=dtype, device=device, gen=g)
    # k and v as the projection makes them: (B, Lq, Hk, D) viewed as (B, Hk, Lq, D), strided
    k = rand(B, Lq, Hk, D, dtype=dtype, device=device, gen=g).transpose(1, 2)
    v = rand(B, Lq, Hk, D, dtype=dtype, device=device, gen=g).transpose(1, 2)
    kc = rand(B, Hk, C, D, dtype=dtype, device=device, gen=g)
    vc = rand(B, Hk, C, D, dtype=dtype, device=device, gen=g)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    return q, k, v, kc, vc, torch.tensor(lens, dtype=torch.int32, device=device), inv_freq.to(device)


@pytest.mark.parametrize("Lq", [1, 3])
def test_rope_kv_append_cpu_fp64_ring_wrap(Lq):
    q, k, v, kc, vc, cl, f = make_rope(3, 4, 2, Lq, 16, [Lq, 16, 4097])
    kc2, vc2 = kc.clone(), vc.clone()
    got = ops.rope_kv_append(q, k, v, kc, vc, cl, f, backend="ext")
    want = ops.rope_kv_append_reference(q, k, v, kc2, vc2, cl, f)
    assert err(got, want) < 1e-12 and err(kc, kc2) < 1e-12 and torch.equal(vc, vc2)
    # the new tokens really went into slot position % C, and the other slots are untouched
    before = make_rope(3, 4, 2, Lq, 16, [Lq, 16, 4097])[3]
    changed = (kc != before).any(-1).any(1)  # (B, C)
    for b, length in enumerate(cl.tolist()):
        slots = {(length - Lq + i) % 16 for i in range(Lq)}
        assert set(torch.nonzero(changed[b]).flatten().tolist()) == slots


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_kv_append_cpu_low_precision(dtype):
    q, k, v, kc, vc, cl, f = make_rope(2, 8, 4, 3, 32, [5, 3000], dtype=dtype)
    q64, k64, v64, kc64, vc64 = (t.double() for t in (q, k, v, kc, vc))
    got = ops.rope_kv_append(q, k, v, kc, vc, cl, f, backend="ext")
    want64 = ops.rope_kv_append_reference(q64, k64, v64, kc64, vc64, cl, f)
    want_lowp = ops.rope_kv_append_reference(q, k, v, kc.clone(), vc.clone(), cl, f)
    assert lowp_ok(got, want_lowp, want64)
    assert torch.equal(vc.double(), vc64)  # v copied bit-exactly


# ---- input checks ----

def test_errors_name_the_problem():
    q, k, v, cl = make_decode(2, 4, 2, 1, 16, [3, 5], dtype=torch.float32)
    call = torch.ops.florenz.decode_attention
    with pytest.raises(RuntimeError, match="cache_lens must be int32, got Long"):
        call(q, k, v, cl.long(), SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"cache_lens must have shape \(2\)"):
        call(q, k, v, cl[:1], SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="k_cache is Half but q is Float"):
        call(q, k.half(), v, cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="4 query heads are not a multiple of 3 key/value heads"):
        call(q, k[:, :1].expand(2, 3, 16, 64), v[:, :1].expand(2, 3, 16, 64), cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"q must be \(B, H, Lq, D\), got \[2, 4, 64\]"):
        call(q[:, :, 0], k, v, cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="Lq = 9 new tokens; 1..8"):
        call(q.expand(2, 4, 9, 64), k, v, cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="k_cache .* and v_cache .* differ"):
        call(q, k, v[:, :, :8], cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="k_cache must have a contiguous last dim"):
        call(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, cl, SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"cache_lens\[0\] = 0 < Lq = 1"):
        call(q, k, v, torch.tensor([0, 5], dtype=torch.int32), SCALE, 0.0, 0)
    with pytest.raises(RuntimeError, match="k_cache is on meta but q is on cpu"):
        call(q, k.to("meta"), v.to("meta"), cl, SCALE, 0.0, 0)
    qc, kc, vc, index, lens = make_cross(2, 2, 8, [8, 8], 4, 2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"image_index\[3\] = 5 is outside \[0, 2\)"):
        torch.ops.florenz.cross_decode_attention(qc, kc, vc, torch.tensor([0, 1, 1, 5], dtype=torch.int32), lens,
                                                 SCALE, 0.0)
    with pytest.raises(RuntimeError, match=r"image_lens must have shape \(2\)"):
        torch.ops.florenz.cross_decode_attention(qc, kc, vc, index, lens[:1], SCALE, 0.0)
    rq, rk, rv, rkc, rvc, rcl, rf = make_rope(2, 4, 2, 1, 8, [1, 2], dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"inv_freq must be float32 of shape \(32\)"):
        torch.ops.florenz.rope_kv_append(rq, rk, rv, rkc, rvc, rcl, rf.double())
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):  # the extension's backend is `ext`
        ops.decode_attention(q, k, v, cl, scale=SCALE, backend="cuda")
    # the CUDA flash-decoding kernel takes CUDA tensors only: on CPU ones cached_attention's `ext` passes the call on
    # to the key-masked attention (ops.attention), exactly the reference
    pos = torch.tensor(4)
    ext = ops.cached_attention(q, k, v, pos, scale=SCALE, softcap=5.0, backend="ext")
    assert torch.equal(ext, ops.cached_attention(q, k, v, pos, scale=SCALE, softcap=5.0, backend="torch"))


def test_meta_tensors_give_shapes():
    q, k, v, cl = make_decode(2, 4, 2, 3, 16, [3, 5], dtype=torch.bfloat16)
    out = torch.ops.florenz.decode_attention(q.to("meta"), k.to("meta"), v.to("meta"), cl.to("meta"), SCALE, 0.0, 0)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_meta


# ---- GPU: CUDA kernels vs the CPU implementation and the reference ----

def _gpu_case_decode(B, H, Hk, Lq, C, lens, D, window, dtype=torch.bfloat16):
    # a sequence holds at least its Lq new tokens (shorter lengths are an input error: test_errors_name_the_problem;
    # on the lent H100 that error, raised inside this grid's Lq = 8 cases, crashed the process instead)
    lens = [max(n, Lq) for n in lens]
    q, k, v, cl = make_decode(B, H, Hk, Lq, C, lens, D=D, dtype=dtype)
    cpu = ops.decode_attention(q, k, v, cl, scale=D ** -0.5, softcap=50.0, window=window, backend="ext")
    dev = [t.cuda() for t in (q, k, v, cl)]
    got = ops.decode_attention(*dev, scale=D ** -0.5, softcap=50.0, window=window, backend="ext").cpu()
    ref64 = ops.decode_attention_reference(q.double(), k.double(), v.double(), cl, D ** -0.5, 50.0, window)
    ref_lowp = ops.decode_attention_reference(*dev, D ** -0.5, 50.0, window).cpu()
    return got, cpu, ref64, ref_lowp


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("H,Hk", HEADS + [(8, 4)])
@pytest.mark.parametrize("Lq", [1, 3, 8])
@pytest.mark.parametrize("C,lens,window", [(64, [3, 64, 17, 40], 0),  # one split
                                           (2048, [8, 2048, 1000, 1337], 0),  # flash-decoding splits
                                           (70, [8, 70, 500, 4099], 63)])  # ring buffer, window 63
def test_gpu_decode_vs_cpu_and_reference(D, H, Hk, Lq, C, lens, window):
    got, cpu, ref64, ref_lowp = _gpu_case_decode(4, H, Hk, Lq, C, lens, D, window)
    assert lowp_ok(got, ref_lowp, ref64)
    # same inputs, both accumulate in fp32: at most about one bf16 rounding step apart
    assert err(got, cpu) <= 2 ** -7 * ref64.abs().max().item()


@pytest.mark.gpu
def test_gpu_decode_batch_64_fp16():
    got, cpu, ref64, ref_lowp = _gpu_case_decode(64, 8, 4, 1, 512, list(range(1, 513, 8)), 256, 0,
                                                 dtype=torch.float16)
    assert lowp_ok(got, ref_lowp, ref64) and err(got, cpu) <= 2 ** -9 * ref64.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 256])
@pytest.mark.parametrize("Lq", [1, 3])
def test_gpu_cross_vs_cpu_and_reference(D, Lq):
    q, k, v, index, lens = make_cross(3, 4, 577, [577, 100, 0], 8, 4, D=D, dtype=torch.bfloat16)
    q = q.expand(-1, -1, Lq, -1).contiguous()
    cpu = ops.cross_decode_attention(q, k, v, index, lens, scale=D ** -0.5, softcap=50.0, backend="ext")
    dev = [t.cuda() for t in (q, k, v, index, lens)]
    assert not dev[1].is_contiguous()
    got = ops.cross_decode_attention(*dev, scale=D ** -0.5, softcap=50.0, backend="ext").cpu()
    ref64 = ops.cross_decode_attention_reference(q.double(), k.double(), v.double(), index, lens, D ** -0.5, 50.0)
    ref_lowp = ops.cross_decode_attention_reference(*dev, D ** -0.5, 50.0).cpu()
    assert lowp_ok(got, ref_lowp, ref64)
    assert err(got, cpu) <= 2 ** -7 * ref64.abs().max().item()
    assert (got[8:] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("Lq", [1, 3])
def test_gpu_rope_kv_append(Lq):
    q, k, v, kc, vc, cl, f = make_rope(4, 8, 4, Lq, 40, [Lq, 40, 77, 8191], D=256, dtype=torch.bfloat16)
    kc_cpu, vc_cpu = kc.clone(), vc.clone()
    cpu = ops.rope_kv_append(q, k, v, kc_cpu, vc_cpu, cl, f, backend="ext")
    dq, dk, dv, dkc, dvc, dcl, df = (t.cuda() for t in (q, k, v, kc, vc, cl, f))
    got = ops.rope_kv_append(dq, dk, dv, dkc, dvc, dcl, df, backend="ext").cpu()
    q64 = ops.rope_kv_append_reference(q.double(), k.double(), v.double(), kc.double(), vc.double(), cl, f)
    q_lowp = ops.rope_kv_append_reference(q, k, v, kc.clone(), vc.clone(), cl, f)
    assert lowp_ok(got, q_lowp, q64)
    assert err(got, cpu) <= 2 ** -7 * q64.abs().max().item()
    assert err(dkc.cpu(), kc_cpu) <= 2 ** -7 * kc_cpu.abs().max().item()
    assert torch.equal(dvc.cpu(), vc_cpu)
