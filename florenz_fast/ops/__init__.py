"""One functional API for every attention call in the engine, with pluggable backends.

Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, D head dim,
T total packed query tokens, Tk total packed key tokens, N number of packed segments.

    attention(q, k, v, *, scale, softcap=0.0, causal=False, window=None,
              key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, backend=None) -> out

Layouts
  padded: q (B, H, L, D), k and v (B, Hk, S, D), out (B, H, L, D). `key_padding_mask` (B, S) bool, True = a
          real key. Query rows belonging to padding are computed like any other row and are the caller's to
          ignore; a row with no visible key returns zeros (never NaN).
  packed: q (T, H, D), k and v (Tk, Hk, D), out (T, H, D); `cu_seqlens_q` (N+1,) and `cu_seqlens_k` (N+1,)
          int32 cumulative lengths (first 0, last T / Tk). Query segment i attends only to key segment i
          (block-diagonal), which is what packed self-attention and packed cross-attention both need.
          Self-attention passes the same cu_seqlens for both. max_seqlen_* are hints for kernels.

Semantics (the reference backend `torch` is the definition)
  scores = (q @ k^T) * scale; with softcap c > 0: scores = c * tanh(scores / c); masks; softmax in fp32,
  cast back to q's dtype; out = probs @ v. GQA: query head h reads key/value head h // (H // Hk).
  causal: bottom-right aligned. Query i of a segment with L queries and S keys sits at key position
          p(i) = i + S - L and sees keys j <= p(i) (for S == L: the usual j <= i; for one decode query:
          all S keys).
  window W (requires causal): additionally p(i) - j < W, i.e. the query itself and the W - 1 keys before it,
          W keys at most. This is the convention of transformers' Gemma-2 (`kv_idx > q_idx - W`).
          window=None or 0 means no window.

Backends: `torch` (reference, always present), `dense`, `sdpa` and `flex` (plain PyTorch, below), `triton`
(florenz_kernels). Choose per call (`backend=`), with `set_backend`, or with the FLORENZ_ATTN_BACKEND
environment variable. A chain "a+b" tries a, then b, for calls a backend does not cover (it raises
`Unsupported`), and ends at the `torch` reference: "sdpa+triton" runs the encoder's and the vision tower's
softcap-free attention on SDPA and the decoder's on the Triton kernel.
  dense  the reference math, but packed batches are gathered into one padded batch (one gather in, one out)
         instead of the reference's (T, Tk) block-diagonal mask: the fast plain-PyTorch path for packed softcap
         attention. No backend reads a tensor back to the host when the caller passes max_seqlen_q / max_seqlen_k
         (DESIGN.md 13); without them the packed cu_seqlens are validated on the host (CPU tensors only).
  sdpa   torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / CPU-fused kernels) for
         calls without softcap and window (packed ones gathered into a padded batch as in `dense`); raises
         Unsupported otherwise. Rows that see no key return zeros, as everywhere.
  flex   FlexAttention: softcap as a score_mod, causal / window / key mask / packed segments as one BlockMask
         (cached across the layers of a forward: same cu_seqlens or key-mask tensor, unchanged). Compiled on GPUs
         (one compile per shape: packed batches of new lengths recompile); eager on the CPU, where it has no
         backward, so a CPU call that needs gradients raises Unsupported (the chain's next backend takes it).

The same switch selects the decoder fusions (one backend name for the whole engine):

    rms_norm(x, weight, eps)                                        Gemma RMSNorm, fp32 math, (1 + w), cast back
    add_rms_norm(residual, y, weight, eps, scale=None, next_weight=None) -> (h, next_or_None)
                                                                    h = residual + scale * rms_norm(y, weight);
                                                                    next = rms_norm(h, next_weight)
    geglu(gate, up)                                                 gelu_tanh(gate) * up
    rope(q, k, cos, sin) -> (q, k)                                  rotate-half RoPE; cos/sin (B|1, 1, L, D)
    linear_cross_entropy(hidden, weight, labels, softcap=30.0, ignore_index=-100, z_loss=0.0, reduction="mean")
                                                                    lm_head + final softcap + cross-entropy
    image_tokens(x, pos, weight, ln_weight, ln_bias, eps)           x + pos, mean token first, projection,
                                                                    LayerNorm (the vision tower's last step)
    dropout(x, p, training=True)                                    F.dropout (`torch`); `dense`: a cheaper CPU
                                                                    mask from 32-bit random words (ops.dense)

Each has a `torch` implementation (florenz_kernels.reference: the definition, what the model computed before the
fusions; math in promote_types(dtype, float32), so float64 stays float64) and a `triton` one from florenz_kernels
(`register_backend(name, fn, op=...)`). A backend that registers only attention (e.g. a future flash-attn one)
leaves the fusions on `torch`. The triton fusions fall back to
`torch` where their kernels do not run: CPU tensors without TRITON_INTERPRET=1, float64, mixed dtypes they do
not cover — except the fused loss, whose chunked algorithm runs on a plain CPU with torch ops for the per-row
part (it never materialises the (T, V) logits). The triton `rope` rotates q and k in place and keeps their
dtype (under autocast the reference's fp32 tables promote them to fp32 instead).

Decode-time ops (florenz_fast.ops.decode; shapes and slot rule there): decode_attention, cross_decode_attention,
rope_kv_append (the CUDA kernels of csrc/, extension florenz_fast._C) and cached_attention (one generation step over
the static KV cache). Same chain, one more backend name: `ext` = the extension (`torch.ops.florenz.*`: CUDA kernels
for CUDA tensors, its CPU implementation for CPU tensors; Unsupported where it is not built), `torch` = the
references. Without a per-call `backend=` they run "ext+<engine chain>" (the extension wherever it is built, as
generation always did); `backend="torch"` forces the reference, `backend="ext"` the extension.
extension_status() / extension_available() say whether it is built.

Modules: registry (tables, chain, set_backend), attention (API, checks, `torch`), dense (`dense`, `sdpa`), flex,
triton (every `triton` backend), fusions (the fused ops' APIs and `torch`), decode. The package attribute
`attention` is the function; import the submodule as `importlib.import_module("florenz_fast.ops.attention")`.
Tests that save / restore the process-wide default touch `florenz_fast.ops.registry._default_backend`.
"""

from __future__ import annotations

from typing import Callable

import torch

from florenz_kernels.reference import cu_seqlens_from_lengths, positions_from_cu_seqlens, softcap, visibility_mask

# The order below is the registration order: the registry first, then each module registers its backends.
# isort: off
from .registry import OPS, Unsupported, available_backends, get_backend, register_backend, set_backend
from .attention import attention  # registers `torch`
from . import dense as dense, flex as flex  # register `dense`, `sdpa`, `flex` (imported for that)
from .fusions import add_rms_norm, dropout, geglu, image_tokens, linear_cross_entropy, rms_norm, rope
from .decode import (cached_attention, cross_decode_attention, cross_decode_attention_reference,
                     decode_attention, decode_attention_reference, extension_available, extension_status,
                     rope_kv_append, rope_kv_append_reference)
from .triton import triton_runs_on, use_fused_kernels  # registers `triton` where importable
# isort: on

AttentionFn = Callable[..., torch.Tensor]

__all__ = [
    "attention", "Unsupported", "register_backend", "set_backend", "get_backend", "available_backends", "OPS",
    "rms_norm", "add_rms_norm", "dropout", "geglu", "rope", "linear_cross_entropy", "image_tokens",
    "decode_attention", "cross_decode_attention", "rope_kv_append", "cached_attention",
    "decode_attention_reference", "cross_decode_attention_reference", "rope_kv_append_reference",
    "extension_status", "extension_available", "softcap", "cu_seqlens_from_lengths", "positions_from_cu_seqlens",
    "visibility_mask", "triton_runs_on", "use_fused_kernels",
]
