"""`flex`: FlexAttention. Softcap as a score_mod, causal / window / key mask / packed segments as one BlockMask
(cached across the layers of a forward: same cu_seqlens or key-mask tensor, unchanged). Compiled on GPUs (one
compile per shape); eager on the CPU, where it has no backward, so a CPU call that needs gradients raises
Unsupported (the chain's next backend takes it)."""

from __future__ import annotations

import warnings

import torch

from .memo import memo
from .registry import Unsupported, register_backend

_flex_compiled = None


def _flex_fn(device_type: str):
    """torch.compile(flex_attention) on GPUs (the fused kernel); eager on the CPU (a reference-speed forward)."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cpu":
        return flex_attention
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def _flex_block_mask(mask_mod, B, Q, K, device, key, tensors):
    """create_block_mask, memoised (ops.memo) so the layers of one forward share one mask. `key` says what the
    mask depends on besides `tensors`, which are compared by identity and version (an in-place change rebuilds)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return memo(("flex", *key), tensors,
                lambda: create_block_mask(mask_mod, B=B, H=None, Q_LEN=Q, KV_LEN=K, device=device))


def _attention_flex(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, dropout_p):
    if dropout_p:
        raise Unsupported("FlexAttention has no dropout")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise Unsupported("FlexAttention has no backward on the CPU")
    cap = float(softcap)
    score_mod = (lambda s, b, h, qi, ki: torch.tanh(s / cap) * cap) if cap else None
    window = int(window) if window else 0
    if cu_seqlens_q is not None:  # packed: one batch row, a document id and an aligned position per token
        T, Tk = q.shape[0], k.shape[0]
        if T == 0:
            return torch.zeros_like(q)
        lq, lk = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        doc_q = torch.repeat_interleave(torch.arange(lq.numel(), device=q.device), lq, output_size=T)
        doc_k = torch.repeat_interleave(torch.arange(lk.numel(), device=q.device), lk, output_size=Tk)
        # query i of segment n sits at key position i + S_n - L_n (bottom-right causal, as everywhere)
        pos_q = torch.arange(T, device=q.device) - cu_seqlens_q[:-1].long()[doc_q] + (lk - lq)[doc_q]
        pos_k = torch.arange(Tk, device=q.device) - cu_seqlens_k[:-1].long()[doc_k]

        def mask_mod(b, h, qi, ki):
            m = doc_q[qi] == doc_k[ki]
            if causal:
                m = m & (pos_k[ki] <= pos_q[qi])
                if window:
                    m = m & (pos_q[qi] - pos_k[ki] < window)
            return m

        key = ("packed", T, Tk, causal, window, q.device)
        mask = _flex_block_mask(mask_mod, None, T, Tk, q.device, key, (cu_seqlens_q, cu_seqlens_k))
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    else:
        L, S = q.shape[2], k.shape[2]
        kpm = key_padding_mask.bool() if key_padding_mask is not None else None
        shift = S - L

        def mask_mod(b, h, qi, ki):
            m = qi >= 0  # all True, as a tensor
            if causal:
                m = m & (ki <= qi + shift)
                if window:
                    m = m & (qi + shift - ki < window)
            if kpm is not None:
                m = m & kpm[b, ki]
            return m

        mask = None
        if causal or kpm is not None:  # the key mask varies over the batch: then one mask per batch row
            B = q.shape[0] if kpm is not None else None
            tensors = (key_padding_mask,) if kpm is not None else ()
            mask = _flex_block_mask(mask_mod, B, L, S, q.device, ("padded", B, L, S, causal, window, q.device),
                                    tensors)
        q4, k4, v4 = q, k, v
    with warnings.catch_warnings():  # eager (CPU) flex warns once that it is not the fused kernel
        warnings.simplefilter("ignore", UserWarning)
        out = _flex_fn(q.device.type)(q4, k4, v4, score_mod=score_mod, block_mask=mask, scale=scale,
                                      enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1) if cu_seqlens_q is not None else out


register_backend("flex", _attention_flex)
