"""The softcapped attention kernel as a transformers AttentionInterface function.

    register_transformers_attention(name="florenz_softcap") -> name

then `AutoModel.from_pretrained(..., attn_implementation=name)`, or `model.config._attn_implementation = name` on
a built model, runs florenz_kernels.softcap_attention in every attention layer that dispatches through
transformers' `ALL_ATTENTION_FUNCTIONS` (Gemma-2: causal, sliding-window layers, logit softcap, GQA).

transformers is imported only inside `register_transformers_attention`, and the kernel module only on the first
attention call: importing this module pulls in neither transformers nor triton, and Triton, which decides
interpreted vs compiled when the kernels are decorated, still sees a TRITON_INTERPRET=1 set after this import.
"""

from __future__ import annotations

__all__ = ["register_transformers_attention", "softcap_attention_forward"]


def softcap_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                              sliding_window=None, is_causal=None, **kwargs):
    """transformers AttentionInterface function (the signature transformers calls its attention functions with).

    Args:
      module: the calling attention module; `module.training` (dropout check) and `module.is_causal` (used when
        `is_causal` is None; default True) are read.
      query: (B, H, L, D) fp16 / bf16 / fp32, any strides with a contiguous last dim (transformers' (B, L, H, D)
        storage transposed is taken as is).
      key, value: (B, Hk, S, D), same dtype as query, H % Hk == 0 (GQA: K/V are not expanded).
      attention_mask: what the mask function registered under the same name returns: None (no padding) or the
        (B, S') bool / int key-padding mask, nonzero = a real key (transformers' `flash_attention_mask`); its
        last S columns are used. Causality and the window come from `is_causal` / `sliding_window`, never from
        the mask.
      scaling: score scale; None = D**-0.5.
      dropout: attention dropout probability. The kernel has no dropout: a call with dropout > 0 from a module in
        training (BART's attention_dropout, 0.1 in Florence-2's configs) runs the pure-torch reference
        (florenz_kernels.reference.attention_reference, dropout on the probabilities as transformers' eager path)
        instead, so a model with attention dropout still trains, at the reference's speed.
      softcap: logit softcap c (Gemma-2's attn_logit_softcapping); None or 0 = no cap, else s = c * tanh(s / c).
      sliding_window: window W for causal layers (query i sees keys j with p(i) - W < j <= p(i), bottom-right
        aligned); None or 0 = no window; ignored for non-causal calls.
      is_causal: overrides `module.is_causal` when not None.
      **kwargs: packed (padding-free) batches, B == 1 and no padding mask, either as transformers'
        flash-attention kwargs `cu_seq_lens_q` / `cu_seq_lens_k` (+ `max_length_q` / `max_length_k` as Python ints:
        no host sync; what `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` gives) or as `position_ids`
        restarting at each segment (the segments are read from them: a device->host sync per layer, as in
        transformers' own flash-attention path). Other arguments (cache details, ...) are ignored.

    Returns:
      (out (B, L, H, D) in query's dtype, None): transformers' layout, and no attention weights. out is a
      transposed view of the kernel's (B, H, L, D) output, which has query's strides: free for transformers'
      (B, L, H, D) storage.
    """
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = int(sliding_window) if (causal and sliding_window) else None
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("florenz softcap attention expects the 2D padding mask of its registered mask "
                             f"function, got shape {tuple(attention_mask.shape)}")
        kpm = attention_mask[:, -key.shape[2]:].bool()
    if dropout and module.training:
        from ..reference import attention_reference

        out = attention_reference(query, key, value, scale=query.shape[-1] ** -0.5 if scaling is None else scaling,
                                  softcap=float(softcap or 0.0), causal=causal, window=window, key_padding_mask=kpm,
                                  dropout_p=float(dropout))
        return out.transpose(1, 2), None
    packed = _packed_layout(query, key, kpm, kwargs)
    if packed is not None:  # (1, H, T, D) -> (T, H, D) views; the kernel's packed layout takes any strides
        from ..softcap_attention import softcap_attention

        cu_q, cu_k, max_q, max_k = packed
        out, _ = softcap_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                   softcap=float(softcap or 0.0), scale=scaling, causal=causal, window=window,
                                   cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
        return out[None], None  # (1, T, H, D): transformers' layout
    from ..softcap_attention import softcap_attention

    out, _ = softcap_attention(query, key, value, softcap=float(softcap or 0.0), scale=scaling, causal=causal,
                               window=window, key_padding_mask=kpm)
    return out.transpose(1, 2), None  # out has q's strides: for transformers' (B, L, H, D) storage this is free


def _packed_layout(query, key, kpm, kwargs):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for a packed (padding-free) call, else None.
    Only B == 1 self-attention without a padding mask can be packed (transformers' own rule, `_is_packed_sequence`)."""
    if query.shape[0] != 1 or kpm is not None:
        return None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        return cu_q, cu_k, None if max_q is None else int(max_q), None if max_k is None else int(max_k)
    pos = kwargs.get("position_ids")
    L = query.shape[2]
    if pos is None or L == 1 or key.shape[2] != L or pos.numel() != L:
        return None
    import torch

    pos = pos.reshape(-1)
    starts = torch.nonzero(pos == pos.min()).flatten()  # a host sync: pass cu_seq_lens_* to avoid it
    if starts.numel() <= 1:
        return None
    cu = torch.cat([starts, starts.new_tensor([L])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def register_transformers_attention(name: str = "florenz_softcap") -> str:
    """Register the kernel with transformers' AttentionInterface, and transformers' 2D padding-mask function
    (`flash_attention_mask`) with its AttentionMaskInterface under the same name, so that
    `from_pretrained(..., attn_implementation=name)` or `config._attn_implementation = name` runs it.

    Args:
      name: the attn_implementation name to register (registering again replaces the earlier entry).

    Returns:
      name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, softcap_attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
