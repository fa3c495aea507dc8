"""florenz_kernels.reference (the one pure-torch reference per op) and the ops `torch` backend keep float64 float64.

For every op: a float64 input gives a float64 output, through the reference and through ops.<op>(backend="torch"),
equal to a float64 computation written here independently (loops / explicit formulas) to 1e-12 of its scale. The
tolerance can fail: the same reference run on the inputs rounded to fp32 (what a reference that downcast float64
would compute) misses it by ~1e-7, asserted for each op as well.
"""

from __future__ import annotations

import math

import pytest
import torch

from florenz_fast import ops
from florenz_kernels import reference as R

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # tiny tensors (tests/conftest.py)

TOL = 1e-12


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def f32(*ts):
    return [t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in ts]


def check64(outs, want, downcast):
    """outs: float64 results (reference, ops); want: the independent float64 value; downcast: the fp32 run."""
    bound = TOL * max(1.0, want.abs().max().item())
    for got in outs:
        assert got.dtype == torch.float64, got.dtype
        err = (got - want).abs().max().item()
        assert err <= bound, err
    assert (downcast.double() - want).abs().max().item() > bound, "the tolerance would not catch an fp32 reference"


# ---- independent float64 attention -----------------------------------------------------------------------------


def naive_block(q_HLD, k_HSD, v_HSD, scale, softcap, visible):
    """One sequence, loops over heads and queries; visible(i, j) -> bool."""
    H, L, D = q_HLD.shape
    Hk, S = k_HSD.shape[0], k_HSD.shape[1]
    out = torch.zeros(H, L, D, dtype=torch.float64)
    for h in range(H):
        kh = h // (H // Hk)
        for i in range(L):
            keys = [j for j in range(S) if visible(i, j)]
            if not keys:
                continue
            s = torch.stack([(q_HLD[h, i] * k_HSD[kh, j]).sum() * scale for j in keys])
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.exp(s - s.max())
            p = p / p.sum()
            out[h, i] = sum(p[n] * v_HSD[kh, j] for n, j in enumerate(keys))
    return out


def causal_window(L, S, causal, window, key_ok=None):
    def visible(i, j):
        p = i + S - L
        if causal and j > p:
            return False
        if window and p - j >= window:
            return False
        return key_ok is None or bool(key_ok[j])
    return visible


def test_attention_padded_float64():
    B, H, Hk, L, S, D = 2, 4, 2, 5, 7, 8
    q, k, v = rand(B, H, L, D, seed=1), rand(B, Hk, S, D, seed=2), rand(B, Hk, S, D, seed=3)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[1, 4:] = False
    kw = dict(scale=0.4, softcap=2.0, causal=True, window=4, key_padding_mask=kpm)
    want = torch.stack([naive_block(q[b], k[b], v[b], 0.4, 2.0, causal_window(L, S, True, 4, kpm[b]))
                        for b in range(B)])
    check64([R.attention_reference(q, k, v, **kw), ops.attention(q, k, v, backend="torch", **kw)], want,
            R.attention_reference(*f32(q, k, v), **kw))


def test_attention_packed_float64():
    H, Hk, D = 4, 1, 8
    lq, lk = [3, 0, 6, 1], [5, 2, 6, 0]  # an empty query segment and a segment without keys
    q, k, v = rand(sum(lq), H, D, seed=4), rand(sum(lk), Hk, D, seed=5), rand(sum(lk), Hk, D, seed=6)
    cu_q, cu_k = ops.cu_seqlens_from_lengths(lq), ops.cu_seqlens_from_lengths(lk)
    kw = dict(scale=0.3, softcap=3.0, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    want = torch.zeros_like(q)
    for n in range(len(lq)):
        qs, ks = slice(int(cu_q[n]), int(cu_q[n + 1])), slice(int(cu_k[n]), int(cu_k[n + 1]))
        seg = naive_block(q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1), 0.3, 3.0,
                          causal_window(lq[n], lk[n], True, None))
        want[qs] = seg.transpose(0, 1)
    out, lse = R.attention_reference(q, k, v, return_lse=True, **kw)
    assert lse.dtype == torch.float64 and lse.shape == (H, q.shape[0])
    check64([out, ops.attention(q, k, v, backend="torch", **kw)], want, R.attention_reference(*f32(q, k, v), **kw))


# ---- the fusions -------------------------------------------------------------------------------------------------


def naive_rms_norm(x, w, eps):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * (1 + w)


def test_rms_norm_float64():
    x, w = rand(3, 5, 37, seed=1, scale=3.0), rand(37, seed=2, scale=0.3)
    want = naive_rms_norm(x, w, 1e-6)
    check64([R.rms_norm_reference(x, w, 1e-6), ops.rms_norm(x, w, 1e-6, backend="torch")], want,
            R.rms_norm_reference(*f32(x, w), 1e-6))


def test_add_rms_norm_float64():
    x, y = rand(4, 40, seed=1), rand(4, 40, seed=2, scale=2.0)
    w, w2, s = rand(40, seed=3, scale=0.3), rand(40, seed=4, scale=0.3), rand(1, seed=5)
    h_want = x + s * naive_rms_norm(y, w, 1e-6)
    next_want = naive_rms_norm(h_want, w2, 1e-5)
    kw = dict(scale=s, next_weight=w2, next_eps=1e-5)
    ref_h, ref_next = R.add_rms_norm_reference(x, y, w, 1e-6, **kw)
    ops_h, ops_next = ops.add_rms_norm(x, y, w, 1e-6, backend="torch", **kw)
    s32, w2_32 = f32(s, w2)
    low_h, low_next = R.add_rms_norm_reference(*f32(x, y, w), 1e-6, scale=s32, next_weight=w2_32, next_eps=1e-5)
    check64([ref_h, ops_h], h_want, low_h)
    check64([ref_next, ops_next], next_want, low_next)


def test_geglu_float64():
    g, u = rand(3, 50, seed=1, scale=2.5), rand(3, 50, seed=2)
    want = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    check64([R.geglu_reference(g, u), ops.geglu(g, u, backend="torch")], want, R.geglu_reference(*f32(g, u)))


def naive_rope(x, c, s):
    """x (..., D), c / s (..., D/2) broadcastable: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def test_rope_float64():
    B, H, Hk, L, D = 2, 4, 2, 9, 16
    q, k = rand(B, H, L, D, seed=1), rand(B, Hk, L, D, seed=2)
    angles = ((torch.arange(L, dtype=torch.float64) + 1000)[:, None]
              * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D))
    c_half, s_half = angles.cos()[None], angles.sin()[None]  # (1, L, D/2): the kernel layout
    want = naive_rope(q, c_half[:, None], s_half[:, None]), naive_rope(k, c_half[:, None], s_half[:, None])
    cos, sin = torch.cat([c_half, c_half], -1)[:, None], torch.cat([s_half, s_half], -1)[:, None]  # (1, 1, L, D)
    got_ref, got_ops = R.rope_reference(q, k, c_half, s_half), ops.rope(q, k, cos, sin, backend="torch")
    low = R.rope_full_reference(*f32(q, k, cos, sin))
    for i in range(2):
        check64([got_ref[i], got_ops[i]], want[i], low[i])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy_float64(reduction):
    T, D, V = 11, 16, 37
    h, w = rand(T, D, seed=1), rand(V, D, seed=2, scale=0.5)
    labels = torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(3))
    labels[[2, 7]] = -100
    kw = dict(softcap=3.0, ignore_index=-100, z_loss=1e-2, reduction=reduction)
    z = 3.0 * torch.tanh((h @ w.T) / 3.0)
    m = z.max(-1, keepdim=True).values
    lse = (m + torch.log(torch.exp(z - m).sum(-1, keepdim=True)))[:, 0]
    valid = labels != -100
    tok = torch.stack([lse[t] - z[t, labels[t]] + 1e-2 * lse[t] ** 2 if valid[t] else torch.zeros((), dtype=z.dtype)
                       for t in range(T)])
    want = tok if reduction == "none" else tok.sum() / valid.sum()
    check64([R.linear_cross_entropy_reference(h, w, labels, **kw), ops.linear_cross_entropy(h, w, labels,
                                                                                          backend="torch", **kw)],
            want, R.linear_cross_entropy_reference(*f32(h, w), labels, **kw))


def test_image_tokens_float64():
    B, N, C, d = 2, 9, 12, 10
    x, pos, W = rand(B, N, C, seed=1), rand(N, C, seed=2), rand(d, C, seed=3, scale=0.3)
    lw, lb = rand(d, seed=4), rand(d, seed=5)
    y = x + pos
    y = torch.cat([y.sum(1, keepdim=True) / N, y], dim=1)
    z = torch.einsum("bnc,dc->bnd", y, W)
    mu = z.sum(-1, keepdim=True) / d
    var = ((z - mu) ** 2).sum(-1, keepdim=True) / d
    want = (z - mu) / torch.sqrt(var + 1e-5) * lw + lb
    check64([R.image_tokens_reference(x, pos, W, lw, lb, 1e-5),
             ops.image_tokens(x, pos, W, lw, lb, 1e-5, backend="torch")],
            want, R.image_tokens_reference(*f32(x, pos, W, lw, lb), 1e-5))


# ---- decode ops (references in florenz_fast.ops.decode) -------------------------------------------------------


def slot_position(s, length, C):
    """The largest position p < length with p % C == s, None if s >= length (the documented slot rule)."""
    if s >= length:
        return None
    return max(p for p in range(length) if p % C == s)


def test_decode_attention_float64():
    B, H, Hk, Lq, C, D, window = 3, 4, 2, 2, 7, 8, 5
    q, k, v = rand(B, H, Lq, D, seed=1), rand(B, Hk, C, D, seed=2), rand(B, Hk, C, D, seed=3)
    lens = torch.tensor([2, 7, 19], dtype=torch.int32)  # the last one wrapped the ring
    want = torch.zeros_like(q)
    for b in range(B):
        n = int(lens[b])
        pos = [slot_position(s, n, C) for s in range(C)]

        def visible(i, s, n=n, pos=pos):
            p = n - Lq + i
            return pos[s] is not None and pos[s] <= p and p - pos[s] < window
        want[b] = naive_block(q[b], k[b], v[b], 0.3, 4.0, visible)
    kw = dict(scale=0.3, softcap=4.0, window=window)
    check64([ops.decode_attention_reference(q, k, v, lens, 0.3, 4.0, window),
             ops.decode_attention(q, k, v, lens, backend="torch", **kw)], want,
            ops.decode_attention_reference(*f32(q, k, v), lens, 0.3, 4.0, window))


def test_cross_decode_attention_float64():
    N, H, Hk, Lq, S, D = 4, 4, 2, 2, 6, 8
    q, k, v = rand(N, H, Lq, D, seed=1), rand(2, S, Hk, D, seed=2), rand(2, S, Hk, D, seed=3)
    index, lens = torch.tensor([0, 0, 1, 1], dtype=torch.int32), torch.tensor([6, 3], dtype=torch.int32)
    want = torch.stack([naive_block(q[n], k[index[n]].transpose(0, 1), v[index[n]].transpose(0, 1), 0.3, 4.0,
                                    lambda i, j, m=int(lens[index[n]]): j < m) for n in range(N)])
    check64([ops.cross_decode_attention_reference(q, k, v, index, lens, 0.3, 4.0),
             ops.cross_decode_attention(q, k, v, index, lens, scale=0.3, softcap=4.0, backend="torch")], want,
            ops.cross_decode_attention_reference(*f32(q, k, v), index, lens, 0.3, 4.0))


def test_rope_kv_append_float64():
    B, H, Hk, Lq, C, D = 2, 4, 2, 2, 5, 8
    q, k, v = rand(B, H, Lq, D, seed=1), rand(B, Hk, Lq, D, seed=2), rand(B, Hk, Lq, D, seed=3)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    lens = torch.tensor([2, 13], dtype=torch.int32)
    pos = lens[:, None].long() - Lq + torch.arange(Lq)  # (B, Lq)
    # the definition: fp32 angles (as the model's Rotary builds them), their cos / sin in float64
    angles = (pos.float()[..., None] * inv_freq).double()[:, None]  # (B, 1, Lq, D/2)
    want_q, want_k = naive_rope(q, angles.cos(), angles.sin()), naive_rope(k, angles.cos(), angles.sin())
    outs, caches = [], []
    for fn in (lambda *a: ops.rope_kv_append_reference(*a), lambda *a: ops.rope_kv_append(*a, backend="torch")):
        kc, vc = torch.zeros(B, Hk, C, D, dtype=torch.float64), torch.zeros(B, Hk, C, D, dtype=torch.float64)
        outs.append(fn(q, k, v, kc, vc, lens, inv_freq))
        caches.append((kc, vc))
    low_kc, low_vc = torch.zeros(B, Hk, C, D), torch.zeros(B, Hk, C, D)
    low = ops.rope_kv_append_reference(*f32(q, k, v), low_kc, low_vc, lens, inv_freq)
    check64(outs, want_q, low)
    want_kc = torch.zeros(B, Hk, C, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Lq):
            want_kc[b, :, int(pos[b, i]) % C] = want_k[b, :, i]
    check64([kc for kc, _ in caches], want_kc, low_kc)
    for _, vc in caches:
        assert vc.dtype == torch.float64
        for b in range(B):
            for i in range(Lq):
                assert torch.equal(vc[b, :, int(pos[b, i]) % C], v[b, :, i])


def test_cached_attention_float64():
    N, H, Hk, C, D = 2, 4, 2, 6, 8
    q, k, v = rand(N, H, 1, D, seed=1), rand(N, Hk, C, D, seed=2), rand(N, Hk, C, D, seed=3)
    for p in (2, 9):  # a partly written cache, and a ring that wrapped (every slot written)
        want = torch.stack([naive_block(q[n], k[n], v[n], 0.3, 4.0, lambda i, s: s <= p) for n in range(N)])
        pos = torch.tensor(p)
        check64([ops.cached_attention(q, k, v, pos, scale=0.3, softcap=4.0, backend="torch")], want,
                ops.cached_attention(*f32(q, k, v), pos, scale=0.3, softcap=4.0, backend="torch"))
