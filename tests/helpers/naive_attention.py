"""A deliberately naive attention, written from the documented conventions only (florenz_fast.ops' docstring),
with explicit Python loops over batch / head / query position and the visible key set built one key at a time:
  scores = q . k * scale; softcap c > 0: c * tanh(s / c); softmax over the visible keys only;
  GQA: query head h reads kv head h // (H // Hk);
  causal (bottom-right): query i of a segment with L queries and S keys sits at p(i) = i + S - L, sees j <= p(i);
  window W (causal only): additionally p(i) - j < W; window None / 0 = no window;
  a row with no visible key is zeros.
The reference of tests/test_ops.py, and of test_softcap_attention's check that its float64 references are this one.

Shape legend: B batch, H query heads, Hk kv heads, L queries, S keys, D head dim.
"""

from __future__ import annotations

import torch


def _visible_keys(i: int, L: int, S: int, *, causal: bool, window: int | None, key_ok=None) -> list[int]:
    p = i + S - L  # bottom-right alignment
    keys = []
    for j in range(S):
        if causal and not j <= p:
            continue
        if window and not p - j < window:
            continue
        if key_ok is not None and not key_ok[j]:
            continue
        keys.append(j)
    return keys


def _naive_block(q_HLD, k_HSD, v_HSD, *, scale, softcap, causal, window, key_ok, dtype):
    """One padded block (one batch element or one packed segment), computed row by row in `dtype`."""
    H, L, D = q_HLD.shape
    Hk, S, Dv = v_HSD.shape
    groups = H // Hk
    softmax_dtype = torch.promote_types(dtype, torch.float32)  # "softmax in fp32" (fp64 stays fp64)
    rows_H = []
    for h in range(H):
        kvh = h // groups
        rows_L = []
        for i in range(L):
            keys = _visible_keys(i, L, S, causal=causal, window=window, key_ok=key_ok)
            if not keys:
                rows_L.append(torch.zeros(Dv, dtype=dtype))
                continue
            idx = torch.tensor(keys)
            s = (k_HSD[kvh, idx].to(dtype) @ q_HLD[h, i].to(dtype)) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            s = s.to(softmax_dtype)
            e = torch.exp(s - s.max())
            w = (e / e.sum()).to(dtype)
            rows_L.append(w @ v_HSD[kvh, idx].to(dtype))
        rows_H.append(torch.stack(rows_L) if rows_L else torch.zeros(0, Dv, dtype=dtype))
    return torch.stack(rows_H)


def naive_attention(q, k, v, *, scale, softcap=0.0, causal=False, window=None, key_padding_mask=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, dtype=torch.float64):
    kw = dict(scale=scale, softcap=softcap, causal=causal, window=window, dtype=dtype)
    if cu_seqlens_q is None:
        outs = []
        for b in range(q.shape[0]):
            key_ok = None if key_padding_mask is None else [bool(x) for x in key_padding_mask[b]]
            outs.append(_naive_block(q[b], k[b], v[b], key_ok=key_ok, **kw))
        return torch.stack(outs)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    segs = []
    for n in range(len(bq) - 1):
        q_HLD = q[bq[n]:bq[n + 1]].transpose(0, 1)
        k_HSD = k[bk[n]:bk[n + 1]].transpose(0, 1)
        v_HSD = v[bk[n]:bk[n + 1]].transpose(0, 1)
        segs.append(_naive_block(q_HLD, k_HSD, v_HSD, key_ok=None, **kw).transpose(0, 1))
    return torch.cat(segs)
