"""ops.attention: the API, its input checks and the `torch` backend (florenz_kernels.reference.attention_reference,
the definition). Layouts and conventions: florenz_fast.ops' docstring."""

from __future__ import annotations

import torch

from florenz_kernels.reference import attention_reference, check_attention_inputs, visibility_mask  # noqa: F401

from .registry import dispatch, register_backend


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    softcap: float = 0.0,
    causal: bool = False,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Softcapped, optionally causal / windowed, GQA attention over padded or packed batches (see florenz_fast.ops)."""
    # cu_seqlens values are read only for a caller without host metadata (no max_seqlen_q / max_seqlen_k): see
    # check_attention_inputs; the model always passes them, so its step reads nothing back (DESIGN.md 13)
    check_attention_inputs(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           check_values=max_seqlen_q is None or max_seqlen_k is None)
    return dispatch("attention", backend, q, k, v, scale=scale, softcap=softcap, causal=causal, window=window or None,
                    key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p)


def _attention_torch(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, dropout_p):
    return attention_reference(q, k, v, scale=scale, softcap=softcap, causal=causal, window=window,
                               key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, dropout_p=dropout_p)


register_backend("torch", _attention_torch)
