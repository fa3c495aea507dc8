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
      dropout: attention dropout probability; must be 0 in training (the kernel has no dropout).
      softcap: logit softcap c (Gemma-2's attn_logit_softcapping); None or 0 = no cap, else s = c * tanh(s / c).
      sliding_window: window W for causal layers (query i sees keys j with p(i) - W < j <= p(i), bottom-right
        aligned); None or 0 = no window; ignored for non-causal calls.
      is_causal: overrides `module.is_causal` when not None.
      **kwargs: other transformers arguments (position ids, cache details), ignored.

    Returns:
      (out (B, L, H, D) in query's dtype, None): transformers' layout, and no attention weights. out is a
      transposed view of the kernel's (B, H, L, D) output, which has query's strides: free for transformers'
      (B, L, H, D) storage.
    """
    from ..softcap_attention import softcap_attention

    if dropout and module.training:
        raise NotImplementedError("florenz softcap attention has no attention dropout")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("florenz softcap attention expects the 2D padding mask of its registered mask "
                             f"function, got shape {tuple(attention_mask.shape)}")
        kpm = attention_mask[:, -key.shape[2]:].bool()
    out, _ = softcap_attention(query, key, value, softcap=float(softcap or 0.0), scale=scaling, causal=bool(causal),
                               window=int(sliding_window) if (causal and sliding_window) else None,
                               key_padding_mask=kpm)
    return out.transpose(1, 2), None  # out has q's strides: for transformers' (B, L, H, D) storage this is free


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
