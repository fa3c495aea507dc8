"""florenz_fast.ops.attention (backend `torch`) against a deliberately naive float64 implementation.

The naive reference (tests/helpers/naive_attention.py) uses the documented conventions only (module docstring of
florenz_fast/ops/__init__.py), with explicit Python loops over batch / head / query position and the visible key set
built one key at a time:
  scores = q . k * scale; softcap c > 0: c * tanh(s / c); softmax over the visible keys only;
  GQA: query head h reads kv head h // (H // Hk);
  causal (bottom-right): query i of a segment with L queries and S keys sits at p(i) = i + S - L, sees j <= p(i);
  window W (causal only): additionally p(i) - j < W; window None / 0 = no window;
  a row with no visible key is zeros.
Tolerances follow DESIGN.md rule 3: fp32 within 1e-5 (relative to the value scale) of float64; fp16 / bf16
within 2x the error of the same naive reference computed in that low precision.

Shape legend: B batch, H query heads, Hk kv heads, L queries, S keys, D head dim, T / Tk packed tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from florenz_fast import ops
from florenz_fast.ops import dense as ops_dense
from florenz_fast.ops import flex as ops_flex
from florenz_fast.ops import registry
from tests.helpers import error_rule
from tests.helpers.naive_attention import naive_attention  # the naive reference described above

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors (tests/conftest.py)


# ---- helpers ------------------------------------------------------------------------------------


def _randn(*shape, seed, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def _qkv_padded(B, H, Hk, L, S, D, *, seed=0, dtype=torch.float32):
    return (_randn(B, H, L, D, seed=seed, dtype=dtype), _randn(B, Hk, S, D, seed=seed + 1, dtype=dtype),
            _randn(B, Hk, S, D, seed=seed + 2, dtype=dtype))


def _qkv_packed(T, Tk, H, Hk, D, *, seed=0, dtype=torch.float32):
    return (_randn(T, H, D, seed=seed, dtype=dtype), _randn(Tk, Hk, D, seed=seed + 1, dtype=dtype),
            _randn(Tk, Hk, D, seed=seed + 2, dtype=dtype))


def assert_fp32_close(ours, ref64, rel=1e-5):
    assert ours.dtype == torch.float32
    assert ours.shape == ref64.shape
    assert torch.isfinite(ours).all()
    err = (ours.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    bound = rel * max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    assert err <= bound, f"max abs error {err:.3g} > {bound:.3g}"


def attended_sets(L, S, *, causal, window, key_padding_mask=None, B=1, H=2, Hk=1, scale=0.7):
    """Read off the visible key set of every (b, h, i) row: q = 0 makes the softmax uniform over the visible
    keys and v = one-hot rows makes out[b, h, i, j] = 1/n for each visible key j and exactly 0 otherwise."""
    q = torch.zeros(B, H, L, S)
    k = _randn(B, Hk, S, S, seed=7)
    v = torch.eye(S).expand(B, Hk, S, S).contiguous()
    out = ops.attention(q, k, v, scale=scale, causal=causal, window=window, key_padding_mask=key_padding_mask)
    assert out.shape == (B, H, L, S)
    assert not torch.isnan(out).any()
    sets = {}
    for b in range(B):
        for h in range(H):
            for i in range(L):
                row = out[b, h, i]
                keys = {j for j in range(S) if row[j] != 0}
                for j in keys:  # uniform weights over the visible set
                    assert abs(row[j].item() - 1 / len(keys)) < 1e-6, (b, h, i, row)
                sets[b, h, i] = keys
    return sets


def expected_window_keys(i, L, S, W):
    """Closed form of the documented convention: query at p sees keys p-W+1..p (clipped to 0..S-1)."""
    p = i + S - L
    if p < 0:
        return set()
    lo = max(0, p - W + 1) if W else 0
    return set(range(lo, min(p, S - 1) + 1))


# ---- window / causal edges read off exactly -----------------------------------------------------

L8 = 8


@pytest.mark.parametrize("window", [1, 2, L8 - 1, L8, L8 + 3, None, 0])
def test_window_edges_exact_visible_set(window):
    sets = attended_sets(L8, L8, causal=True, window=window)
    for (_, _, i), keys in sets.items():
        assert keys == expected_window_keys(i, L8, L8, window), (i, keys)
    # spelled out for the edges: W=1 sees only itself, W=2 itself and one before, W>=L and no window = causal
    if window == 1:
        assert [sets[0, 0, i] for i in range(L8)] == [{i} for i in range(L8)]
    if window == 2:
        assert sets[0, 0, 0] == {0} and sets[0, 0, 5] == {4, 5}
    if window == L8 - 1:
        assert sets[0, 0, L8 - 1] == set(range(1, L8)) and sets[0, 0, L8 - 2] == set(range(L8 - 1))
    if window in (L8, L8 + 3, None, 0):
        assert [sets[0, 0, i] for i in range(L8)] == [set(range(i + 1)) for i in range(L8)]


def test_non_causal_sees_every_key():
    sets = attended_sets(5, 9, causal=False, window=None)
    assert all(keys == set(range(9)) for keys in sets.values())


@pytest.mark.parametrize("window, expected", [(None, set(range(13))), (0, set(range(13))), (1, {12}),
                                              (4, {9, 10, 11, 12}), (13, set(range(13))), (20, set(range(13)))])
def test_causal_single_decode_query_bottom_right(window, expected):
    sets = attended_sets(1, 13, causal=True, window=window)
    assert sets[0, 0, 0] == expected and sets[0, 1, 0] == expected


@pytest.mark.parametrize("L, S, window", [(3, 10, None), (3, 10, 4), (5, 5, None), (5, 5, 3), (6, 4, None),
                                          (6, 4, 2), (7, 1, None), (1, 1, 1)])
def test_causal_bottom_right_alignment(L, S, window):
    sets = attended_sets(L, S, causal=True, window=window)
    for (_, _, i), keys in sets.items():
        assert keys == expected_window_keys(i, L, S, window), (i, keys)
    if (L, S, window) == (3, 10, 4):
        assert [sets[0, 0, i] for i in range(3)] == [{4, 5, 6, 7}, {5, 6, 7, 8}, {6, 7, 8, 9}]
    if (L, S) == (6, 4):  # L > S: the first L - S queries sit before every key -> zeros, not NaN
        assert sets[0, 0, 0] == set() and sets[0, 0, 1] == set() and sets[0, 0, 2] == {0}


@pytest.mark.parametrize("L, S", [(1, 1), (1, 13), (7, 7), (7, 20), (20, 7), (97, 97)])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_causal_window_matches_naive(L, S, window):
    q, k, v = _qkv_padded(2, 2, 1, L, S, 16, seed=L * 100 + S)
    out = ops.attention(q, k, v, scale=0.25, causal=True, window=window)
    ref = naive_attention(q.double(), k.double(), v.double(), scale=0.25, causal=True, window=window)
    assert_fp32_close(out, ref)


# ---- GQA and head dims --------------------------------------------------------------------------


@pytest.mark.parametrize("H, Hk", [(2, 2), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("D", [16, 64, 128, 256])
def test_gqa_and_head_dims(H, Hk, D):
    L = S = 7
    q, k, v = _qkv_padded(2, H, Hk, L, S, D, seed=D + H)
    kw = dict(scale=D ** -0.5, causal=True, window=4, softcap=5.0)
    out = ops.attention(q, k, v, **kw)
    ref = naive_attention(q.double(), k.double(), v.double(), **kw)
    assert_fp32_close(out, ref)
    # equals the computation with explicitly expanded K/V (head h -> kv head h // (H // Hk))
    idx = torch.tensor([h // (H // Hk) for h in range(H)])
    out_expanded = ops.attention(q, k[:, idx], v[:, idx], **kw)
    torch.testing.assert_close(out, out_expanded, rtol=0, atol=1e-6)


@pytest.mark.parametrize("H, Hk", [(4, 2), (8, 2), (6, 3)])
def test_gqa_head_mapping_is_h_div_groups(H, Hk):
    # kv head g carries the constant value g + 1 in v; with uniform weights out[h] == (h // (H // Hk)) + 1,
    # which a modulo mapping (h % Hk) would get wrong
    q = torch.zeros(1, H, 3, 8)
    k = _randn(1, Hk, 5, 8, seed=3)
    v = torch.arange(1, Hk + 1, dtype=torch.float32)[None, :, None, None].expand(1, Hk, 5, 8).contiguous()
    out = ops.attention(q, k, v, scale=1.0)
    for h in range(H):
        assert torch.allclose(out[0, h], torch.full((3, 8), float(h // (H // Hk) + 1)), rtol=0, atol=1e-6), h


# ---- softcap ------------------------------------------------------------------------------------


def test_softcap_exact_two_key_example():
    # scores [100, 0]: capped at 1 -> [tanh(100), 0] = [1, 0] -> weights [e/(1+e), 1/(1+e)]
    q = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    k = torch.tensor([[100.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    v = torch.eye(2).view(1, 1, 2, 2)
    capped = ops.attention(q, k, v, scale=1.0, softcap=1.0)[0, 0, 0]
    uncapped = ops.attention(q, k, v, scale=1.0, softcap=0.0)[0, 0, 0]
    e = math.e
    assert torch.allclose(capped, torch.tensor([e / (1 + e), 1 / (1 + e)]), rtol=0, atol=1e-6)
    assert torch.allclose(uncapped, torch.tensor([1.0, 0.0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("softcap", [0.0, 1.0, 30.0])
def test_softcap_matches_naive(softcap):
    q, k, v = _qkv_padded(2, 4, 2, 9, 11, 32, seed=11)
    kw = dict(scale=1.0, softcap=softcap, causal=True)  # scale 1 on D=32: scores ~ +-6, the cap matters
    out = ops.attention(q, k, v, **kw)
    assert_fp32_close(out, naive_attention(q.double(), k.double(), v.double(), **kw))
    if softcap == 0.0:
        default = ops.attention(q, k, v, scale=1.0, causal=True)
        assert torch.equal(out, default)


def test_softcap_changes_result_for_large_scores():
    q, k, v = _qkv_padded(1, 2, 2, 6, 6, 64, seed=5)
    capped = ops.attention(q, k, v, scale=1.0, softcap=2.0)
    uncapped = ops.attention(q, k, v, scale=1.0)
    assert (capped - uncapped).abs().max().item() > 0.1
    # and with small scores a large cap is (nearly) the identity
    small_capped = ops.attention(q, k, v, scale=1e-3, softcap=1e3)
    small = ops.attention(q, k, v, scale=1e-3)
    assert (small_capped - small).abs().max().item() < 1e-6


# ---- key_padding_mask (padded layout) -----------------------------------------------------------


def _mask_B3():
    return torch.tensor([[True] * 9,
                         [True, False, True, True, False, False, True, False, True],
                         [False] * 9])


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding_mask_exact_visible_set(causal):
    mask = _mask_B3()
    sets = attended_sets(9, 9, causal=causal, window=None, key_padding_mask=mask, B=3)
    for (b, _, i), keys in sets.items():
        allowed = set(range(i + 1)) if causal else set(range(9))
        assert keys == {j for j in allowed if mask[b, j]}, (b, i, keys)
    assert all(sets[2, h, i] == set() for h in range(2) for i in range(9))  # fully masked: zeros
    if causal:
        assert sets[1, 0, 0] == {0} and sets[1, 0, 5] == {0, 2, 3}


def test_key_padding_mask_matches_naive_and_fully_masked_row_is_zero():
    mask = _mask_B3()
    mask[1, 0] = False  # with causal, row 0 of batch 1 now sees nothing at all
    q, k, v = _qkv_padded(3, 4, 2, 9, 9, 16, seed=21)
    kw = dict(scale=0.5, softcap=3.0, causal=True, window=4, key_padding_mask=mask)
    out = ops.attention(q, k, v, **kw)
    assert_fp32_close(out, naive_attention(q.double(), k.double(), v.double(), **kw))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(out[1, :, 0], torch.zeros_like(out[1, :, 0]))


def test_fully_masked_rows_have_finite_gradients_matching_naive():
    mask = _mask_B3()
    q, k, v = _qkv_padded(3, 2, 1, 9, 9, 8, seed=31)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    g = _randn(3, 2, 9, 8, seed=32)
    kw = dict(scale=0.5, causal=True, key_padding_mask=mask)
    ops.attention(q, k, v, **kw).backward(g)
    naive_attention(q64, k64, v64, **kw).backward(g.double())
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert torch.isfinite(ours).all()
        assert_fp32_close(ours, ref, rel=1e-5)
    assert torch.equal(q.grad[2], torch.zeros_like(q.grad[2]))  # fully masked batch: nothing flows back


# ---- packed layout ------------------------------------------------------------------------------


def _padded_segment(q, k, v, qs, ks, **kw):
    """Run one packed segment alone in the padded layout."""
    out = ops.attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None], v[ks].transpose(0, 1)[None],
                        **kw)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("lengths", [[1, 7, 97], [7, 0, 1, 97, 0], [1], [97], [0, 7]])
@pytest.mark.parametrize("causal, window, softcap", [(False, None, 0.0), (True, None, 0.0), (True, 5, 2.0)])
def test_packed_self_attention_equals_per_segment(lengths, causal, window, softcap):
    H, Hk, D = 4, 2, 16
    cu = ops.cu_seqlens_from_lengths(lengths)
    T = int(cu[-1])
    q, k, v = _qkv_packed(T, T, H, Hk, D, seed=sum(lengths))
    kw = dict(scale=D ** -0.5, causal=causal, window=window, softcap=softcap)
    out = ops.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths),
                        max_seqlen_k=max(lengths), **kw)
    assert out.shape == (T, H, D)
    for n in range(len(lengths)):
        s = slice(int(cu[n]), int(cu[n + 1]))
        if s.stop > s.start:
            torch.testing.assert_close(out[s], _padded_segment(q, k, v, s, s, **kw), rtol=0, atol=1e-6)
    ref = naive_attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu, cu_seqlens_k=cu, **kw)
    assert_fp32_close(out, ref)


def test_packed_cross_attention_block_diagonal_exact():
    # decoder segment n must see exactly the keys of encoder segment n, uniformly (q = 0, one-hot v)
    lq, lk = [3, 1, 0, 5, 2], [4, 0, 6, 9, 1]
    cu_q, cu_k = ops.cu_seqlens_from_lengths(lq), ops.cu_seqlens_from_lengths(lk)
    T, Tk = sum(lq), sum(lk)
    q = torch.zeros(T, 2, Tk)
    k = _randn(Tk, 1, Tk, seed=41)
    v = torch.eye(Tk)[:, None, :].contiguous()
    out = ops.attention(q, k, v, scale=1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert not torch.isnan(out).any()
    for n in range(len(lq)):
        keys = list(range(int(cu_k[n]), int(cu_k[n + 1])))
        want = torch.zeros(Tk)
        if keys:
            want[keys] = 1 / len(keys)
        for t in range(int(cu_q[n]), int(cu_q[n + 1])):
            for h in range(2):
                assert torch.allclose(out[t, h], want, rtol=0, atol=1e-6), (n, t, h, out[t, h])
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # segment 1: one query, no keys -> zeros


@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, 3)])
def test_packed_cross_attention_equals_per_segment(causal, window):
    lq, lk = [1, 7, 0, 5, 3], [97, 7, 4, 0, 1]
    cu_q, cu_k = ops.cu_seqlens_from_lengths(lq), ops.cu_seqlens_from_lengths(lk)
    q, k, v = _qkv_packed(sum(lq), sum(lk), 4, 1, 32, seed=51)
    kw = dict(scale=32 ** -0.5, softcap=4.0, causal=causal, window=window)
    out = ops.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    for n in range(len(lq)):
        qs, ks = slice(int(cu_q[n]), int(cu_q[n + 1])), slice(int(cu_k[n]), int(cu_k[n + 1]))
        if qs.stop == qs.start:
            continue
        if ks.stop == ks.start:
            assert torch.equal(out[qs], torch.zeros_like(out[qs]))
            continue
        torch.testing.assert_close(out[qs], _padded_segment(q, k, v, qs, ks, **kw), rtol=0, atol=1e-6)
    ref = naive_attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    assert_fp32_close(out, ref)


# ---- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_low_precision_within_2x_of_low_precision_reference(dtype, layout):
    H, Hk, D = 4, 2, 64
    kw = dict(scale=D ** -0.5, softcap=8.0, causal=True, window=6)
    if layout == "padded":
        q, k, v = _qkv_padded(2, H, Hk, 13, 17, D, seed=61, dtype=dtype)
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[1, 12:] = False
        kw["key_padding_mask"] = mask
    else:
        cu = ops.cu_seqlens_from_lengths([1, 7, 29])
        q, k, v = _qkv_packed(37, 37, H, Hk, D, seed=61, dtype=dtype)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    out = ops.attention(q, k, v, **kw)
    assert out.dtype == dtype
    ref64 = naive_attention(q.double(), k.double(), v.double(), **kw)
    ref_low = naive_attention(q, k, v, dtype=dtype, **kw)
    # the low-precision reference really is low precision (the bound below is not vacuous)
    assert error_rule.max_error(ref_low, ref64) > 0
    error_rule.assert_within_2x(out, ref64, ref_low, f"{dtype}", atol=1e-6)


def test_fp32_within_1e5_of_float64():
    q, k, v = _qkv_padded(2, 4, 4, 33, 33, 128, seed=71)
    kw = dict(scale=128 ** -0.5, softcap=20.0, causal=True)
    out = ops.attention(q, k, v, **kw)
    assert_fp32_close(out, naive_attention(q.double(), k.double(), v.double(), **kw), rel=1e-5)


def test_float64_inputs_are_computed_in_float64():
    # The float64 path is what DESIGN.md rule 3 compares kernels against; it must be float64-accurate, i.e.
    # "softmax in fp32" must not down-cast float64 scores.
    q, k, v = _qkv_padded(1, 2, 1, 9, 9, 16, seed=81, dtype=torch.float64)
    kw = dict(scale=0.5, softcap=3.0, causal=True, window=4)
    out = ops.attention(q, k, v, **kw)
    assert out.dtype == torch.float64
    err = (out - naive_attention(q, k, v, **kw)).abs().max().item()
    assert err < 1e-12, f"float64 attention is only {err:.3g} accurate"


# ---- gradients ----------------------------------------------------------------------------------


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_causal_window_softcap():
    q, k, v = _qkv_padded(1, 2, 2, 5, 6, 4, seed=91, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _gradcheck(lambda q, k, v: ops.attention(q, k, v, scale=0.7, softcap=1.5, causal=True, window=3), q, k, v)


def test_gradcheck_gqa():
    q, k, v = _qkv_padded(1, 4, 2, 4, 5, 4, seed=92, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _gradcheck(lambda q, k, v: ops.attention(q, k, v, scale=0.7, causal=True), q, k, v)


def test_gradcheck_packed():
    cu_q, cu_k = ops.cu_seqlens_from_lengths([1, 3, 0, 2]), ops.cu_seqlens_from_lengths([2, 3, 1, 0])
    q, k, v = _qkv_packed(6, 6, 2, 1, 4, seed=93, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    _gradcheck(lambda q, k, v: ops.attention(q, k, v, scale=0.7, softcap=2.0, causal=True, window=2,
                                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), q, k, v)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fp32_gradients_match_naive_float64(layout):
    # independent of the float64 path of ops: fp32 backward against autograd through the naive loops
    kw = dict(scale=0.35, softcap=3.0, causal=True, window=4)
    if layout == "padded":
        q, k, v = _qkv_padded(2, 4, 2, 7, 9, 8, seed=95)
        g = _randn(2, 4, 7, 8, seed=96)
    else:
        cu = ops.cu_seqlens_from_lengths([1, 7, 0, 12])
        q, k, v = _qkv_packed(20, 20, 4, 2, 8, seed=95)
        g = _randn(20, 4, 8, seed=96)
        kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ops.attention(q, k, v, **kw).backward(g)
    naive_attention(q64, k64, v64, **kw).backward(g.double())
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert_fp32_close(ours, ref, rel=1e-5)


# ---- input validation ---------------------------------------------------------------------------


def _bad_calls():
    q4, k4, v4 = torch.zeros(2, 4, 5, 8), torch.zeros(2, 2, 6, 8), torch.zeros(2, 2, 6, 8)
    q3, k3 = torch.zeros(10, 4, 8), torch.zeros(12, 2, 8)
    cu10, cu12 = torch.tensor([0, 4, 10], dtype=torch.int32), torch.tensor([0, 5, 12], dtype=torch.int32)
    packed = dict(cu_seqlens_q=cu10, cu_seqlens_k=cu12)
    return {
        "q ndim (padded)": ((q4[0], k4, v4), {}, r"q must be \(B, H, L, D\)"),
        "k ndim (padded)": ((q4, k4[0], v4), {}, r"k must be \(B, H, L, D\)"),
        "q ndim (packed)": ((q4, k3, k3), packed, r"q must be \(T, H, D\)"),
        "k/v shape": ((q4, k4, v4[:, :, :5]), {}, r"k \(2, 2, 6, 8\) and v \(2, 2, 5, 8\) differ"),
        "heads not divisible": ((torch.zeros(2, 3, 5, 8), k4, v4), {}, "3 query heads are not a multiple of 2"),
        "head dims": ((torch.zeros(2, 4, 5, 16), k4, v4), {}, "head dims differ"),
        "window without causal": ((q4, k4, v4), dict(window=3), "sliding window is only defined for causal"),
        "only cu_seqlens_q": ((q3, k3, k3), dict(cu_seqlens_q=cu10), "needs both cu_seqlens_q and cu_seqlens_k"),
        "packed + key_padding_mask": ((q3, k3, k3), dict(packed, key_padding_mask=torch.ones(1, 12, dtype=bool)),
                                      "key_padding_mask is for the padded layout"),
        "cu_seqlens entry counts": ((q3, k3, k3), dict(cu_seqlens_q=cu10, cu_seqlens_k=torch.tensor(
            [0, 12], dtype=torch.int32)), "cu_seqlens_q has 3 entries, cu_seqlens_k 2"),
        "cu_seqlens_q wrong total": ((q3, k3, k3), dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                                                        cu_seqlens_k=cu12), "cu_seqlens end at 9/12"),
        "cu_seqlens_k wrong total": ((q3, k3, k3), dict(cu_seqlens_q=cu10, cu_seqlens_k=torch.tensor(
            [0, 5, 13], dtype=torch.int32)), "cu_seqlens end at 10/13"),
        "batch sizes": ((q4[:1], k4, v4), {}, "batch sizes differ, q 1 vs k 2"),
        "key_padding_mask shape": ((q4, k4, v4), dict(key_padding_mask=torch.ones(2, 5, dtype=bool)),
                                   r"key_padding_mask must be \(B, S\)"),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_invalid_inputs_raise_value_error(case):
    args, kw, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        ops.attention(*args, scale=1.0, **kw)


@pytest.mark.parametrize("cu_q", [[2, 5, 10], [0, 6, 4, 10]], ids=["first-not-0", "decreasing"])
def test_malformed_cu_seqlens_raise_value_error(cu_q):
    # documented: cumulative lengths, first 0. Otherwise tokens are left unwritten (torch.empty_like garbage)
    # or attended twice, silently.
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.attention(q, q, q, scale=1.0, cu_seqlens_q=cu_q, cu_seqlens_k=cu_q)


# ---- backend selection --------------------------------------------------------------------------


@pytest.fixture
def backend_state(monkeypatch):
    """Restore the process-wide default, FLORENZ_ATTN_BACKEND and the registry after the test."""
    saved_default, saved_registry = registry._default_backend, dict(registry._BACKENDS)
    monkeypatch.delenv("FLORENZ_ATTN_BACKEND", raising=False)
    calls = []

    def probe(q, k, v, **kw):
        calls.append(kw)
        return torch.full_like(q, 42.0)

    ops.register_backend("probe", probe)
    yield calls
    registry._default_backend = saved_default
    registry._BACKENDS.clear()
    registry._BACKENDS.update(saved_registry)


def test_torch_backend_is_registered():
    assert "torch" in ops.available_backends()
    assert ops.available_backends() == sorted(ops.available_backends())


def test_unknown_backend_argument_raises_value_error(backend_state):
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        ops.attention(q, q, q, scale=1.0, backend="nope")


def test_backend_precedence_and_env(backend_state, monkeypatch):
    calls = backend_state
    q = torch.zeros(1, 2, 3, 4)
    assert ops.get_backend() == "torch"
    assert not torch.equal(ops.attention(q, q, q, scale=1.0), torch.full_like(q, 42.0))

    monkeypatch.setenv("FLORENZ_ATTN_BACKEND", "probe")
    assert ops.get_backend() == "probe"
    assert torch.equal(ops.attention(q, q, q, scale=1.0, causal=True, window=0), torch.full_like(q, 42.0))
    assert calls[-1]["window"] is None and calls[-1]["causal"] is True and calls[-1]["scale"] == 1.0
    # an explicit backend= beats the environment
    assert torch.equal(ops.attention(q, q, q, scale=1.0, backend="torch"), torch.zeros_like(q))
    assert len(calls) == 1

    ops.set_backend("torch")  # set_backend beats the environment
    assert ops.get_backend() == "torch"
    ops.set_backend(None)  # back to the environment
    assert ops.get_backend() == "probe"
    monkeypatch.delenv("FLORENZ_ATTN_BACKEND")
    assert ops.get_backend() == "torch"

    ops.set_backend("probe")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        ops.set_backend("nope")
    assert ops.get_backend() == "probe"  # a failed set_backend leaves the default alone


def test_bad_env_backend_raises_value_error(backend_state, monkeypatch):
    monkeypatch.setenv("FLORENZ_ATTN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLORENZ_ATTN_BACKEND"):
        ops.get_backend()
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        ops.attention(q, q, q, scale=1.0)
    assert torch.equal(ops.attention(q, q, q, scale=1.0, backend="torch"), torch.zeros_like(q))


def test_validation_runs_before_dispatch(backend_state):
    calls = backend_state
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="sliding window"):
        ops.attention(q, q, q, scale=1.0, window=2, backend="probe")
    assert calls == []


# ---- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, expected", [([1, 7, 0, 97], [0, 1, 8, 8, 105]), ([5], [0, 5]), ([], [0]),
                                               (torch.tensor([3, 4]), [0, 3, 7])])
def test_cu_seqlens_from_lengths(lengths, expected):
    cu = ops.cu_seqlens_from_lengths(lengths)
    assert cu.dtype == torch.int32
    assert cu.tolist() == expected


def test_positions_from_cu_seqlens():
    cu = ops.cu_seqlens_from_lengths([1, 7, 0, 3])
    pos = ops.positions_from_cu_seqlens(cu)
    assert pos.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert ops.positions_from_cu_seqlens(ops.cu_seqlens_from_lengths([0])).tolist() == []
    assert ops.positions_from_cu_seqlens(ops.cu_seqlens_from_lengths([97])).tolist() == list(range(97))


@pytest.mark.parametrize("L, S, window", [(5, 5, None), (5, 5, 2), (1, 9, None), (1, 9, 3), (3, 8, 4), (6, 4, None),
                                          (6, 4, 2), (4, 4, 0), (4, 4, 10)])
def test_visibility_mask(L, S, window):
    m = ops.visibility_mask(L, S, causal=True, window=window)
    assert m.dtype == torch.bool and m.shape == (L, S)
    for i in range(L):
        assert {j for j in range(S) if m[i, j]} == expected_window_keys(i, L, S, window), (i, m[i])
    assert ops.visibility_mask(L, S, causal=False, window=None) is None


def test_visibility_mask_spelled_out():
    assert ops.visibility_mask(3, 3, causal=True, window=None).int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert ops.visibility_mask(3, 3, causal=True, window=2).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert ops.visibility_mask(2, 4, causal=True, window=None).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert ops.visibility_mask(1, 4, causal=True, window=2).int().tolist() == [[0, 0, 1, 1]]


def test_softcap_helper():
    x = torch.tensor([-1e4, -30.0, -1.0, 0.0, 1e-3, 5.0, 1e4], dtype=torch.float64)
    assert ops.softcap(x, 0.0) is x
    y = ops.softcap(x, 30.0)
    assert torch.allclose(y, 30.0 * torch.tanh(x / 30.0), rtol=0, atol=1e-12)
    assert y.abs().max().item() <= 30.0 and y[0].item() == pytest.approx(-30.0) and y[-1].item() == pytest.approx(30.0)
    assert y[4].item() == pytest.approx(1e-3, rel=1e-6)  # identity near zero
    assert torch.all(y[1:] > y[:-1])  # monotone


# ---- the plain-PyTorch backends `dense`, `sdpa` and `flex`, and backend chains ---------------------------------

_FAST_CASES = [
    # (layout, H, Hk, L, S, causal, window, softcap, kpm)
    ("padded", 4, 2, 9, 9, True, None, 0.0, False),
    ("padded", 4, 1, 5, 13, True, 4, 3.0, False),
    ("padded", 2, 2, 7, 11, False, None, 0.0, True),
    ("padded", 4, 2, 6, 6, True, 3, 2.0, True),
    ("packed", 4, 2, [1, 7, 0, 5], [1, 7, 0, 5], True, None, 0.0, False),
    ("packed", 4, 1, [3, 1, 6], [9, 4, 2], False, None, 0.0, False),
    ("packed", 2, 1, [2, 5, 4], [6, 5, 1], True, 3, 4.0, False),
    ("packed", 4, 2, [4, 2], [0, 3], False, None, 2.0, False),  # an empty key segment: zeros
]


def _fast_case(case, dtype=torch.float64, seed=0):
    layout, H, Hk, L, S, causal, window, cap, kpm = case
    g = torch.Generator().manual_seed(seed)
    D = 8
    kw = dict(scale=0.4, softcap=cap, causal=causal, window=window)
    if layout == "packed":
        q = torch.randn(sum(L), H, D, generator=g, dtype=dtype)
        k, v = (torch.randn(sum(S), Hk, D, generator=g, dtype=dtype) for _ in range(2))
        kw.update(cu_seqlens_q=ops.cu_seqlens_from_lengths(L), cu_seqlens_k=ops.cu_seqlens_from_lengths(S),
                  max_seqlen_q=max(L), max_seqlen_k=max(S))
    else:
        q = torch.randn(2, H, L, D, generator=g, dtype=dtype)
        k, v = (torch.randn(2, Hk, S, D, generator=g, dtype=dtype) for _ in range(2))
        if kpm:
            m = torch.rand(2, S, generator=g) > 0.3
            m[1] = False  # a batch element with no real key: zeros
            kw["key_padding_mask"] = m
    return q, k, v, kw


def _fwd_bwd(q, k, v, kw, backend):
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*ins, backend=backend, **kw)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(),
                                ins)
    return [out.detach(), *grads]


@pytest.mark.parametrize("case", range(len(_FAST_CASES)))
@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_plain_pytorch_backends_equal_the_reference(case, backend, one_intra_op_thread):
    q, k, v, kw = _fast_case(_FAST_CASES[case])
    if backend == "sdpa" and (kw["softcap"] or kw["window"]):
        with pytest.raises(ops.Unsupported):
            ops_dense._attention_sdpa(q, k, v, **{**dict(key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                                                   max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0), **kw})
    ours = _fwd_bwd(q, k, v, kw, backend)  # sdpa: softcap/window calls fall through the chain to `torch`
    ref = _fwd_bwd(q, k, v, kw, "torch")
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", range(len(_FAST_CASES)))
def test_flex_backend_forward_equals_the_reference(case, one_intra_op_thread):
    # FlexAttention's eager CPU path (float64: exact up to summation order); no backward on the CPU (below)
    q, k, v, kw = _fast_case(_FAST_CASES[case])
    calls = []
    with torch.no_grad():
        flex = ops_flex._flex_fn

        def counting(device_type):
            calls.append(device_type)
            return flex(device_type)

        ops_flex._flex_fn = counting
        try:
            ours = ops.attention(q, k, v, backend="flex", **kw)
        finally:
            ops_flex._flex_fn = flex
        ref = ops.attention(q, k, v, backend="torch", **kw)
    assert calls == ["cpu"], "FlexAttention did not run"
    assert ours.dtype == torch.float64 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_flex_backend_cpu_gradients_fall_through_to_the_reference():
    q, k, v, kw = _fast_case(_FAST_CASES[6])  # packed, causal, window, softcap
    with pytest.raises(ops.Unsupported, match="no backward on the CPU"):
        ops_flex._attention_flex(q.requires_grad_(), k, v, **{**dict(key_padding_mask=None, dropout_p=0.0), **kw})
    ours = _fwd_bwd(q.detach(), k, v, kw, "flex")
    for a, b in zip(ours, _fwd_bwd(q.detach(), k, v, kw, "torch")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flex_block_mask_cache_follows_the_mask_tensor():
    # one BlockMask serves every layer of a forward; an in-place change of the key mask (or a new cu_seqlens
    # tensor) must build a new one
    q, k, v, kw = _fast_case(_FAST_CASES[3])  # padded, causal, window, key mask
    m = kw["key_padding_mask"]
    with torch.no_grad():
        before = ops.attention(q, k, v, backend="flex", **kw)
        m[0, :3] = ~m[0, :3]
        after = ops.attention(q, k, v, backend="flex", **kw)
        ref = ops.attention(q, k, v, backend="torch", **kw)
    assert (before - ref).abs().max() > 1e-3  # the change matters ...
    torch.testing.assert_close(after, ref, rtol=1e-12, atol=1e-12)  # ... and was seen
    q, k, v, kw = _fast_case(_FAST_CASES[4])  # packed self-attention
    with torch.no_grad():
        ops.attention(q, k, v, backend="flex", **kw)
        lengths = [5, 3, 0, 5]  # same totals, other segments, new tensors
        kw.update(cu_seqlens_q=ops.cu_seqlens_from_lengths(lengths), cu_seqlens_k=ops.cu_seqlens_from_lengths(lengths))
        torch.testing.assert_close(ops.attention(q, k, v, backend="flex", **kw),
                                   ops.attention(q, k, v, backend="torch", **kw), rtol=1e-12, atol=1e-12)


def test_backend_chains(backend_state):
    calls = backend_state  # the `probe` backend records its keyword arguments and returns 42s

    def refuse(q, k, v, **kw):
        calls.append("refuse")
        raise ops.Unsupported("not this one")

    ops.register_backend("refuse", refuse)
    q = torch.randn(1, 2, 3, 4)
    ref = ops.attention(q, q, q, scale=0.5, backend="torch")
    # a chain ends at the reference when every member refuses
    assert torch.equal(ops.attention(q, q, q, scale=0.5, backend="refuse+refuse"), ref)
    assert calls[-2:] == ["refuse", "refuse"]
    out = ops.attention(q, q, q, scale=0.5, backend="refuse+probe")
    assert calls[-2] == "refuse" and isinstance(calls[-1], dict) and (out == 42.0).all()
    ops.set_backend("sdpa+refuse")
    assert ops.get_backend() == "sdpa+refuse"
    with pytest.raises(ValueError, match="unknown attention backend 'sdpa\\+nope'"):
        ops.set_backend("sdpa+nope")


# ---- the dense dropout and the per-forward memo -------------------------------------------------------------


def test_dense_dropout_drops_p_and_scales_the_rest_exactly():
    p, n = 0.1, 1_000_001  # odd: the last 64-bit draw is used by half
    drop = round(p * 2**32)
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(0)
    out = ops.dropout(x, p, backend="dense")
    kept = out != 0
    scale = torch.tensor(2**32 / (2**32 - drop), dtype=torch.float32)
    assert (out[kept] == scale).all()  # every kept element scaled by exactly 1 / (1 - P(drop))
    sd = (p * (1 - p) / (n / 2)) ** 0.5
    for word in (0, 1):  # both 32-bit halves of each draw drop with probability p (5 standard deviations)
        frac = 1 - kept[word::2].double().mean().item()
        assert abs(frac - drop / 2**32) < 5 * sd, (word, frac)
    out.backward(torch.full_like(out, 3.0))
    torch.testing.assert_close(x.grad, 3.0 * out.detach(), rtol=0, atol=0)  # the same mask in the backward
    torch.manual_seed(0)
    torch.testing.assert_close(ops.dropout(x.detach(), p, backend="dense"), out.detach(), rtol=0, atol=0)  # seeded


def test_dropout_off_and_out_of_range():
    x = torch.randn(5, 7)
    assert ops.dropout(x, 0.1, training=False, backend="dense") is x
    assert ops.dropout(x, 0.0, backend="dense") is x
    assert (ops.dropout(x, 1.0, backend="dense") == 0).all()  # p = 1: the dense dropout passes on to F.dropout
    with pytest.raises(ops.Unsupported, match="0 < p < 1"):
        ops_dense._dropout_dense(x, 1.0)
    with pytest.raises(ops.Unsupported):
        ops_dense._dropout_dense(x.long(), 0.5)


@pytest.mark.parametrize("backend", ["dense", "sdpa"])
def test_attention_dropout_is_unbiased_and_shared_by_dense_and_sdpa(backend, one_intra_op_thread):
    q, k, v, kw = _fast_case(_FAST_CASES[5], dtype=torch.float32)  # packed cross-attention, no softcap
    clean = ops.attention(q, k, v, backend="torch", **kw)
    torch.manual_seed(3)
    one = ops.attention(q, k, v, backend=backend, dropout_p=0.3, **kw)
    torch.manual_seed(3)
    other = ops.attention(q, k, v, backend="dense" if backend == "sdpa" else "sdpa", dropout_p=0.3, **kw)
    torch.testing.assert_close(one, other, rtol=1e-6, atol=1e-6)  # the same math and the same mask draws
    assert (one - clean).abs().max() > 0.05  # it dropped something
    mean = torch.stack([ops.attention(q, k, v, backend=backend, dropout_p=0.3, **kw) for _ in range(400)]).mean(0)
    # 400 draws: the mean's error is ~0.03 of |v|; a missing 1 / (1 - p) would be off by 30 %
    assert (mean - clean).abs().max() < 0.15 * clean.abs().max()


@pytest.mark.parametrize("case", [0, 1, 3, 6, 7])
def test_dense_core_backward_with_dropout_equals_the_reference_math(case, monkeypatch):
    # the hand-written backward of the dense backend's core (_AttentionCore), dropout included, against
    # attention_block's autograd with the same mask draws, in float64; the core must really run
    from florenz_kernels.reference import attention_block

    runs = []
    real = ops_dense._AttentionCore.apply
    monkeypatch.setattr(ops_dense._AttentionCore, "apply", lambda *a: runs.append(1) or real(*a))
    q, k, v, kw = _fast_case(_FAST_CASES[case])
    torch.manual_seed(5)
    ours = _fwd_bwd(q, k, v, {**kw, "dropout_p": 0.25}, "dense")
    assert runs, "the dense core did not run"
    if "cu_seqlens_q" in kw:  # the same padded blocks as the backend's, through the reference math
        plan = ops_dense._plan(kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
                               q.shape[0], k.shape[0], kw["causal"], kw["window"])

        def ref_fn(q, k, v):
            out = attention_block(ops_dense._ToPadded.apply(q, plan.slot_q, plan.row_q),
                                  ops_dense._ToPadded.apply(k, plan.slot_k, plan.row_k),
                                  ops_dense._ToPadded.apply(v, plan.slot_k, plan.row_k), scale=kw["scale"],
                                  softcap=kw["softcap"], visible_BLS=plan.visible, dropout_p=0.25,
                                  dropout=ops_dense._dropout_dense)
            return ops_dense._FromPadded.apply(out, plan.slot_q, plan.row_q)
    else:
        def ref_fn(q, k, v):
            return attention_block(q, k, v, scale=kw["scale"], softcap=kw["softcap"], dropout_p=0.25,
                                   visible_BLS=ops_dense._dense_visible(q, k, kw["causal"], kw["window"],
                                                                        kw.get("key_padding_mask")),
                                   dropout=ops_dense._dropout_dense)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    out = ref_fn(*ins)
    ref = [out.detach(), *torch.autograd.grad(
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum(), ins)]
    clean = _fwd_bwd(q, k, v, kw, "torch")
    assert (ours[0] - clean[0]).abs().max() > 0.01  # it dropped something
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "add", "add_scale_next"])
def test_dense_rms_norm_backward_equals_the_reference(dtype, variant, monkeypatch):
    from florenz_kernels.reference import add_rms_norm_reference, rms_norm_reference

    runs = []
    real = ops_dense._RMSNorm.apply
    monkeypatch.setattr(ops_dense._RMSNorm, "apply", lambda *a: runs.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(3, 5, 37, generator=g, dtype=dtype) * s for s in (1.0, 3.0))
    w, w2 = (torch.randn(37, generator=g, dtype=dtype) * 0.3 for _ in range(2))
    scale = torch.tensor([0.4], dtype=dtype)

    def run(fn_plain, fn_add, ins):
        ins = [t.clone().requires_grad_() for t in ins]
        if variant == "plain":
            outs = [fn_plain(ins[1], ins[2], 1e-6)]
        else:
            outs = [o for o in fn_add(ins[0], ins[1], ins[2], 1e-6, scale=ins[3] if "scale" in variant else None,
                                      next_weight=ins[4] if "next" in variant else None) if o is not None]
        loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=dtype).view_as(o)).sum() for o in outs)
        used = [t for t in ins if t.requires_grad]
        grads = torch.autograd.grad(loss, used, allow_unused=True)
        return [o.detach() for o in outs] + [gr for gr in grads if gr is not None]

    ins = [x, y, w, scale, w2]
    ours = run(lambda *a: ops.rms_norm(*a, backend="dense"), lambda *a, **k: ops.add_rms_norm(*a, **k, backend="dense"),
               ins)
    assert runs, "the dense RMSNorm did not run"
    ref = run(rms_norm_reference, add_rms_norm_reference, ins)
    assert len(ours) == len(ref) >= 3
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["sum+none", "sum", "mean"])
@pytest.mark.parametrize("softcap, z_loss", [(30.0, 0.0), (2.0, 1e-2), (0.0, 0.0)])
def test_dense_linear_cross_entropy_equals_the_reference(dtype, reduction, softcap, z_loss, monkeypatch):
    from florenz_kernels.reference import linear_cross_entropy_reference

    runs = []
    real = ops_dense._LinearCESum.apply
    monkeypatch.setattr(ops_dense._LinearCESum, "apply", lambda *a: runs.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 19, 16, generator=g, dtype=dtype) * 2
    w = torch.randn(70, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, 70, (2, 19), generator=g)
    labels[:, ::3] = -100
    kw = dict(softcap=softcap, z_loss=z_loss, reduction=reduction)

    def run(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(hh, ww, labels, **kw)
        total, tok = out if reduction == "sum+none" else (out, None)
        grads = torch.autograd.grad(total * 0.75, (hh, ww))
        return [total.detach(), *grads] + ([] if tok is None else [tok, tok.requires_grad])

    ours = run(lambda *a, **k: ops.linear_cross_entropy(*a, **k, backend="dense"))
    assert runs, "the dense loss did not run"
    ref = run(linear_cross_entropy_reference)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref, **tol)
    # "none" (per-token gradients) passes on to the reference
    with pytest.raises(ops.Unsupported):
        ops_dense._linear_cross_entropy_dense(h, w, labels, softcap=softcap, ignore_index=-100, z_loss=z_loss,
                                              reduction="none")


def test_dense_plan_is_built_once_per_layout_and_follows_in_place_changes(monkeypatch):
    built = []
    real = ops_dense._plan
    monkeypatch.setattr(ops_dense, "_plan", lambda *a: built.append(a[2:]) or real(*a))
    q, k, v, kw = _fast_case(_FAST_CASES[4])  # packed self-attention
    cu = kw["cu_seqlens_k"] = kw["cu_seqlens_q"]  # one tensor for both, as the model passes it
    first = ops.attention(q, k, v, backend="dense", **kw)
    torch.testing.assert_close(ops.attention(q, k, v, backend="dense", **kw), first, rtol=0, atol=0)
    assert len(built) == 1  # the second layer's call reused the first one's indices and masks
    cu.copy_(ops.cu_seqlens_from_lengths([5, 3, 0, 5]))  # same total, other segments, in place
    torch.testing.assert_close(ops.attention(q, k, v, backend="dense", **kw),
                               ops.attention(q, k, v, backend="torch", **kw), rtol=1e-12, atol=1e-12)
    assert len(built) == 2
