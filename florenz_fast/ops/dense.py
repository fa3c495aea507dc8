"""`dense` and `sdpa`: plain-PyTorch attention backends; packed batches are gathered into one padded batch (one
gather in, one out) instead of the reference's (T, Tk) block-diagonal mask; no device->host read when the caller
passes max_seqlen_q / max_seqlen_k (the padded widths).

  dense  the reference math (florenz_kernels.reference.attention_block) on the padded batch.
  sdpa   torch.nn.functional.scaled_dot_product_attention for calls without softcap and window (Unsupported
         otherwise); rows that see no key return zeros, as everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from florenz_kernels.reference import attention_block, segments_from_cu_seqlens, visibility_mask

from .registry import Unsupported, register_backend


def _pad_index(cu: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """(N, width) row of each padded slot in the packed tensor of `total` rows; padding slots point at row `total`
    (a zero row). `total` comes from the tensor's shape (= cu[-1]): no read of cu."""
    lengths = (cu[1:] - cu[:-1]).long()
    slots = torch.arange(width, device=cu.device)
    idx = cu[:-1, None].long() + slots[None]
    return torch.where(slots[None] < lengths[:, None], idx, total)


def _gather_padded(x_THD: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(T, heads, D) -> (N, heads, width, D) by one gather (zeros in the padding)."""
    ext = torch.cat([x_THD, x_THD.new_zeros(1, *x_THD.shape[1:])])
    return ext[idx].transpose(1, 2)


def _packed_as_padded(fn, q, k, v, *, causal, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      **kw):
    """Run fn(q, k, v, visible_NLS) on the packed batch gathered into padded form; scatter the rows back.

    The padded widths are the caller's max_seqlen_q / max_seqlen_k (Python ints: the model passes the loader's);
    only a caller without them has the lengths read back here (a device sync)."""
    lq, lk = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    Lmax = int(max_seqlen_q) if max_seqlen_q else int(lq.max()) if lq.numel() else 0
    Smax = int(max_seqlen_k) if max_seqlen_k else int(lk.max()) if lk.numel() else 0
    T = q.shape[0]
    if T == 0 or Lmax == 0:
        return torch.zeros_like(q)
    iq, ik = _pad_index(cu_seqlens_q, Lmax, T), _pad_index(cu_seqlens_k, max(Smax, 1), k.shape[0])
    pos_q = torch.arange(Lmax, device=q.device)[None, :, None]
    pos_k = torch.arange(max(Smax, 1), device=q.device)[None, None, :]
    visible = pos_k < lk[:, None, None]  # (N, L, S): real keys ...
    if causal:  # ... bottom-right aligned per segment: query i sits at key position i + S_n - L_n
        p = pos_q + (lk - lq)[:, None, None]
        visible = visible & (pos_k <= p)
        if window:
            visible = visible & (p - pos_k < window)
    out_N = fn(_gather_padded(q, iq), _gather_padded(k, ik), _gather_padded(v, ik), visible[:, None], **kw)
    seg, pos = segments_from_cu_seqlens(cu_seqlens_q, T)  # packed row t sits in slot (seg, pos): static index math
    return out_N.transpose(1, 2).flatten(0, 1).index_select(0, seg * Lmax + pos)


def _dense_visible(q, k, causal, window, key_padding_mask):
    visible = visibility_mask(q.shape[-2], k.shape[-2], causal=causal, window=window, device=q.device)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()
        visible = pad if visible is None else (visible[None, None] & pad)
    return visible


def _attention_dense_backend(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p):
    def dense(q4, k4, v4, visible):
        return attention_block(q4, k4, v4, scale=scale, softcap=softcap, visible_BLS=visible, dropout_p=dropout_p)

    if cu_seqlens_q is None:
        return dense(q, k, v, _dense_visible(q, k, causal, window, key_padding_mask))
    return _packed_as_padded(dense, q, k, v, causal=causal, window=window, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _attention_sdpa(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, dropout_p):
    if softcap or window:
        raise Unsupported("SDPA has no softcap and no sliding window")

    def sdpa(q4, k4, v4, visible):
        if visible is None:
            return F.scaled_dot_product_attention(q4, k4, v4, dropout_p=dropout_p, scale=scale,
                                                  enable_gqa=q4.shape[1] != k4.shape[1])
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=visible, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=q4.shape[1] != k4.shape[1])
        return out.masked_fill(~visible.any(-1, keepdim=True), 0.0)  # rows that see nothing: zeros, not NaN

    if cu_seqlens_q is None:
        return sdpa(q, k, v, _dense_visible(q, k, causal, window, key_padding_mask))
    return _packed_as_padded(sdpa, q, k, v, causal=causal, window=window, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


register_backend("dense", _attention_dense_backend)
register_backend("sdpa", _attention_sdpa)
