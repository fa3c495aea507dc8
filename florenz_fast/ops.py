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
         instead of a Python loop over segments: the fast plain-PyTorch path for packed softcap attention.
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

Each has a `torch` implementation here (the definition, what the model computed before the fusions) and a
`triton` one from florenz_kernels (`register_backend(name, fn, op=...)`). A backend that registers only
attention (e.g. a future flash-attn one) leaves the fusions on `torch`. The triton fusions fall back to
`torch` where their kernels do not run: CPU tensors without TRITON_INTERPRET=1, float64, mixed dtypes they do
not cover — except the fused loss, whose chunked algorithm runs on a plain CPU with torch ops for the per-row
part (it never materialises the (T, V) logits). The triton `rope` rotates q and k in place and keeps their
dtype (under autocast the reference's fp32 tables promote them to fp32 instead).
"""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]
OPS = ("attention", "rms_norm", "add_rms_norm", "geglu", "rope", "linear_cross_entropy")
_REGISTRY: dict[str, dict[str, Callable]] = {op: {} for op in OPS}
_BACKENDS: dict[str, AttentionFn] = _REGISTRY["attention"]  # the engine's backend names are attention's
_default_backend: str | None = None


class Unsupported(Exception):
    """Raised by a backend for a call it does not cover: the next backend of the chain takes it."""


def register_backend(name: str, fn: Callable, *, op: str = "attention") -> None:
    """Register `fn` as backend `name` of `op` (default: attention, whose names are the engine's backends)."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops: {OPS}")
    _REGISTRY[op][name] = fn


def _impl(op: str, backend: str | None) -> Callable:
    """The first member of the backend chain that implements `op`, else its `torch` definition."""
    fns = _REGISTRY[op]
    for name in _chain(backend or get_backend()):
        if name in fns:
            return fns[name]
    return fns["torch"]


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _chain(name: str) -> list[str]:
    parts = name.split("+")
    if not all(p in _BACKENDS for p in parts):
        raise ValueError(f"unknown attention backend {name!r}; available: {available_backends()} "
                         f"(chains as 'a+b')")
    return parts


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (None: back to FLORENZ_ATTN_BACKEND or `torch`)."""
    global _default_backend
    if name is not None:
        _chain(name)
    _default_backend = name


def get_backend() -> str:
    name = _default_backend or os.environ.get("FLORENZ_ATTN_BACKEND") or "torch"
    try:
        _chain(name)
    except ValueError:
        raise ValueError(f"unknown attention backend {name!r} (FLORENZ_ATTN_BACKEND?); "
                         f"available: {available_backends()}") from None
    return name


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
    """Softcapped, optionally causal / windowed, GQA attention over padded or packed batches (see module doc)."""
    _check_inputs(q, k, v, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    kw = dict(scale=scale, softcap=softcap, causal=causal, window=window or None, key_padding_mask=key_padding_mask,
              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
              max_seqlen_k=max_seqlen_k, dropout_p=dropout_p)
    for name in _chain(backend or get_backend()):
        try:
            return _BACKENDS[name](q, k, v, **kw)
        except Unsupported:
            continue
    return _attention_torch(q, k, v, **kw)


def _check_inputs(q, k, v, causal, window, key_padding_mask, cu_q, cu_k, max_q=None, max_k=None) -> None:
    packed = cu_q is not None or cu_k is not None
    if packed and (cu_q is None or cu_k is None):
        raise ValueError("packed attention needs both cu_seqlens_q and cu_seqlens_k")
    want = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "(T, H, D)" if packed else "(B, H, L, D)"
            raise ValueError(f"attention: {name} must be {layout} for this layout, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    hq, hk = q.shape[1], k.shape[1]  # heads sit in dim 1 in both layouts
    if hq % hk:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hk} key/value heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: head dims differ, q {q.shape[-1]} vs k {k.shape[-1]}")
    if window and not causal:
        raise ValueError("attention: a sliding window is only defined for causal attention")
    if packed:
        if key_padding_mask is not None:
            raise ValueError("attention: key_padding_mask is for the padded layout; packed input uses cu_seqlens")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"attention: cu_seqlens_q has {cu_q.numel()} entries, cu_seqlens_k {cu_k.numel()}")
        # The value checks read cu_seqlens back to the host: a device sync per call for CUDA tensors (every
        # attention call of every layer: it starved the GPU in packed training), and a read that a static, compiled
        # step cannot make on any device (DESIGN.md 13). So they run only for a caller without host metadata: one
        # that passes max_seqlen_q and max_seqlen_k (Python ints) built cu_seqlens on the host and checked them
        # there (packing.host_layout, Layout.from_lengths), and CUDA tensors are never read here.
        if (max_q is not None and max_k is not None) or cu_q.is_cuda or cu_k.is_cuda:
            return
        for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"attention: {name} must start at 0 and never decrease, got {cu.tolist()}")
        if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) != k.shape[0]:
            raise ValueError(f"attention: cu_seqlens end at {int(cu_q[-1])}/{int(cu_k[-1])} but q has "
                             f"{q.shape[0]} and k has {k.shape[0]} tokens")
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"attention: batch sizes differ, q {q.shape[0]} vs k {k.shape[0]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be (B, S) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")


def visibility_mask(L: int, S: int, *, causal: bool, window: int | None, device=None) -> torch.Tensor | None:
    """(L, S) bool, True where query i may see key j under the causal/window convention above; None = all."""
    if not causal:
        return None
    pos_q = torch.arange(L, device=device)[:, None] + (S - L)
    pos_k = torch.arange(S, device=device)[None, :]
    visible = pos_k <= pos_q
    if window:
        visible &= (pos_q - pos_k) < window
    return visible


def _attention_dense(q_BHLD, k_BHSD, v_BHSD, *, scale, softcap, visible_BLS, dropout_p):
    """The reference math on one padded block; `visible_BLS` broadcastable to (B, H, L, S) or None."""
    groups = q_BHLD.shape[1] // k_BHSD.shape[1]
    if groups > 1:  # GQA: query head h uses kv head h // groups (repeat_interleave keeps that order)
        k_BHSD = k_BHSD.repeat_interleave(groups, dim=1)
        v_BHSD = v_BHSD.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q_BHLD, k_BHSD.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if visible_BLS is not None:
        scores = scores.masked_fill(~visible_BLS, float("-inf"))
    # at least fp32 (fp16/bf16 scores are upcast), and fp64 stays fp64 so the reference can be run exactly
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if visible_BLS is not None:  # rows that see nothing: softmax gave NaN; define them as zeros
        probs = probs.masked_fill(~visible_BLS.any(-1, keepdim=True), 0.0)
    probs = probs.to(q_BHLD.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v_BHSD)


def _attention_torch(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, dropout_p):
    if cu_seqlens_q is None:
        L, S = q.shape[2], k.shape[2]
        visible = visibility_mask(L, S, causal=causal, window=window, device=q.device)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].bool()
            visible = pad if visible is None else (visible[None, None] & pad)
        return _attention_dense(q, k, v, scale=scale, softcap=softcap, visible_BLS=visible, dropout_p=dropout_p)
    # packed: the whole row as one block with a block-diagonal (T, Tk) mask, query segment n seeing key segment n
    # under the same causal / window rule; segment ids and positions come from cu_seqlens and the shapes
    # (repeat_interleave with output_size), so nothing is read back to the host. A masked key adds an exact 0 to
    # the softmax sums, so this is the per-segment definition (float64 to rounding); zero-length segments own no
    # rows, and a query segment with no keys sees nothing: zeros.
    T, Tk = q.shape[0], k.shape[0]
    visible = packed_visibility(cu_seqlens_q, cu_seqlens_k, T, Tk, causal=causal, window=window)
    out = _attention_dense(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale,
                           softcap=softcap, visible_BLS=visible, dropout_p=dropout_p)
    return out[0].transpose(0, 1)


def packed_visibility(cu_seqlens_q, cu_seqlens_k, T: int, Tk: int, *, causal: bool, window: int | None):
    """(T, Tk) bool: packed query t may see packed key s (same segment, causal bottom-right aligned per segment,
    window); no device->host read."""
    seg_q, pos_q = segments_from_cu_seqlens(cu_seqlens_q, T)
    seg_k, pos_k = segments_from_cu_seqlens(cu_seqlens_k, Tk)
    visible = seg_q[:, None] == seg_k[None, :]
    if causal:  # query i of segment n sits at key position i + S_n - L_n
        lq, lk = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(), (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
        p = (pos_q + (lk - lq)[seg_q])[:, None]
        visible = visible & (pos_k[None, :] <= p)
        if window:
            visible = visible & (p - pos_k[None, :] < window)
    return visible


register_backend("torch", _attention_torch)


# ---- `dense` and `sdpa`: plain PyTorch, packed batches gathered into one padded batch ------------------------


def _pad_index(cu: torch.Tensor, width: int, total: int) -> torch.Tensor:
    """(N, width) row of each padded slot in the packed tensor of `total` rows; padding slots point at row
    `total` (a zero row). `total` comes from the tensor's shape (= cu[-1]): no read of cu."""
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
        return _attention_dense(q4, k4, v4, scale=scale, softcap=softcap, visible_BLS=visible, dropout_p=dropout_p)

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


# ---- `flex`: FlexAttention (softcap as a score_mod, every mask as one BlockMask) --------------------------------

_FLEX_MASKS: dict[tuple, tuple] = {}  # key -> (weakrefs of the tensors it was built from, their versions, mask)
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
    """create_block_mask, cached per call site so the layers of one forward share one mask. `key` says what the
    mask depends on besides `tensors`, which are compared by identity and version (an in-place change rebuilds)."""
    from torch.nn.attention.flex_attention import create_block_mask

    hit = _FLEX_MASKS.get(key)
    if hit is not None and all(r() is t and r()._version == ver for r, t, ver in zip(hit[0], tensors, hit[1])):
        return hit[2]
    mask = create_block_mask(mask_mod, B=B, H=None, Q_LEN=Q, KV_LEN=K, device=device)
    if len(_FLEX_MASKS) >= 16:
        _FLEX_MASKS.clear()
    _FLEX_MASKS[key] = ([weakref.ref(t) for t in tensors], [t._version for t in tensors], mask)
    return mask


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


# ---- helpers shared by the model ----------------------------------------------------------------

def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(x / c); identity for cap == 0."""
    return torch.tanh(x / cap) * cap if cap else x


_softcap = softcap  # for the functions below whose `softcap` argument shadows it


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Position of each packed token inside its own segment: [0..len0-1, 0..len1-1, ...]. Pass `total` (the
    packed length, from a shape): without it cu_seqlens[-1] is read back (a device sync)."""
    return segments_from_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if total is None else total)[1]


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, position inside the segment) of each of the `total` packed tokens, int64; zero-length
    segments own no token. No device->host read (repeat_interleave with output_size)."""
    cu = cu_seqlens.long()
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1],
                                  output_size=total)
    return seg, torch.arange(total, device=cu.device) - cu[:-1][seg]


# ---- `triton` backend: florenz_kernels.softcap_attention (imported on first use) ------------------------


def _attention_triton(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, dropout_p):
    """The fused Triton kernel (forward + backward, torch.library op `florenz::softcap_attention_fwd`); same
    conventions as the `torch` backend.

    Calls outside what the kernel covers run on the `torch` reference instead, so that the backend can be
    switched on for a whole model: attention dropout (the BART encoder in training), float64, head dims above
    256 (DaViT's channel attention, whose "head dim" is the number of image patches), and CPU tensors unless
    TRITON_INTERPRET=1.
    """
    if dropout_p or q.dtype == torch.float64 or q.shape[-1] > 256 or not triton_runs_on(q):
        return _attention_torch(q, k, v, scale=scale, softcap=softcap, causal=causal, window=window,
                                key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                dropout_p=dropout_p)
    from florenz_kernels.softcap_attention import softcap_attention

    # The kernel takes one dtype. Under autocast, RoPE's fp32 cos/sin promote q and k to fp32 while v comes
    # out of its projection in bf16; run at the autocast dtype, as the matmuls of the reference would.
    dev = q.device.type
    dt = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
          else torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))
    q, k, v = q.to(dt), k.to(dt), v.to(dt)

    out, _ = softcap_attention(q, k, v, softcap=softcap, scale=scale, causal=causal, window=window,
                               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                               max_seqlen_k=max_seqlen_k, key_padding_mask=key_padding_mask)
    return out


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether Triton kernels can run on t: a CUDA tensor, or a CPU one under TRITON_INTERPRET=1."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def use_fused_kernels(t: torch.Tensor) -> bool:
    """True where the `triton` backend is selected and its kernels can run on t. The model's other fused
    kernels (the image-token projection, ...) follow the attention backend: one switch for the engine."""
    return "triton" in get_backend().split("+") and triton_runs_on(t)


def _triton_importable() -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None for name in ("triton", "florenz_kernels"))
    except (ImportError, ValueError):
        return False


# ---- decoder fusions: `torch` = the definition -----------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """Gemma RMSNorm over the last dim: fp32 math, x * rsqrt(mean(x^2) + eps) * (1 + w), cast back to x's dtype."""
    return _impl("rms_norm", backend)(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 scale: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                 next_eps: float | None = None, backend: str | None = None):
    """h = residual + scale * rms_norm(y, weight) (scale: a 1-element tensor or None), and the next pre-norm
    rms_norm(h, next_weight) when next_weight is given (else None). Returns (h, next)."""
    return _impl("add_rms_norm", backend)(residual, y, weight, eps, scale=scale, next_weight=next_weight,
                                          next_eps=eps if next_eps is None else next_eps)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up."""
    return _impl("geglu", backend)(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None):
    """Rotate-half RoPE of q (B, H, L, D) and k (B, Hk, L, D) with cos/sin (B or 1, 1, L, D) (the two halves of the
    last dim equal, as `Rotary.cos_sin` builds them). Returns (q, k); the triton backend rotates in place."""
    return _impl("rope", backend)(q, k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float = 30.0,
                         ignore_index: int = -100, z_loss: float = 0.0, reduction: str = "mean",
                         backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight^T) against labels (ignore_index skipped), per token in fp32.

    hidden (..., D), weight (V, D), labels (...). reduction "none" -> (...) per-token losses (0 where ignored),
    "sum", or "mean" over the non-ignored tokens. z_loss > 0 adds z_loss * logsumexp^2 per token."""
    return _impl("linear_cross_entropy", backend)(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index,
                                                  z_loss=z_loss, reduction=reduction)


def _rms_norm_torch(x, weight, eps):
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).type_as(x)


def _add_rms_norm_torch(residual, y, weight, eps, *, scale, next_weight, next_eps):
    n = _rms_norm_torch(y, weight, eps)
    h = residual + (n if scale is None else scale * n)
    return h, (None if next_weight is None else _rms_norm_torch(h, next_weight, next_eps))


def _geglu_torch(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def _rope_torch(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _linear_cross_entropy_torch(hidden, weight, labels, *, softcap, ignore_index, z_loss, reduction):
    logits = _softcap(F.linear(hidden, weight), softcap).float()
    flat, lab = logits.flatten(0, -2), labels.flatten()
    tok = F.cross_entropy(flat, lab, ignore_index=ignore_index, reduction="none")
    if z_loss:
        tok = tok + torch.where(lab != ignore_index, z_loss * torch.logsumexp(flat, -1).pow(2), 0.0)
    if reduction == "none":
        return tok.view(labels.shape)
    if reduction == "sum":
        return tok.sum()
    return tok.sum() / (lab != ignore_index).sum()


for _op, _fn in (("rms_norm", _rms_norm_torch), ("add_rms_norm", _add_rms_norm_torch), ("geglu", _geglu_torch),
                 ("rope", _rope_torch), ("linear_cross_entropy", _linear_cross_entropy_torch)):
    register_backend("torch", _fn, op=_op)


# ---- decoder fusions: `triton` (florenz_kernels, imported on first use) ------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels_run_on(*ts) -> bool:
    """True where the Triton kernels can run these tensors: CUDA, or the interpreter; fp16/bf16/fp32."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return all((t.is_cuda or interp) and t.dtype in _KERNEL_DTYPES for t in ts if t is not None)


_RMS_NORM_MAX_D = 4096  # florenz_kernels.rms_norm.MAX_D (not imported here: that would import triton)


def _rms_norm_triton(x, weight, eps):
    if not _kernels_run_on(x, weight) or x.shape[-1] > _RMS_NORM_MAX_D:
        return _rms_norm_torch(x, weight, eps)
    from florenz_kernels.rms_norm import rms_norm as kernel

    return kernel(x, weight, eps)


def _add_rms_norm_triton(residual, y, weight, eps, *, scale, next_weight, next_eps):
    if not _kernels_run_on(residual, y, weight, scale, next_weight) or y.shape[-1] > _RMS_NORM_MAX_D:
        return _add_rms_norm_torch(residual, y, weight, eps, scale=scale, next_weight=next_weight, next_eps=next_eps)
    from florenz_kernels.rms_norm import add_rms_norm as kernel

    return kernel(residual, y, weight, eps, scale=scale, next_weight=next_weight, next_eps=next_eps)


def _geglu_triton(gate, up):
    if not _kernels_run_on(gate, up) or gate.dtype != up.dtype or gate.shape != up.shape:
        return _geglu_torch(gate, up)
    from florenz_kernels.geglu import geglu as kernel

    return kernel(gate, up)


def _rope_triton(q, k, cos, sin):
    if not _kernels_run_on(q, k, cos, sin) or q.dtype != k.dtype or q.stride(-1) != 1 or k.stride(-1) != 1:
        return _rope_torch(q, k, cos, sin)
    from florenz_kernels.rope import rope_ as kernel

    half = q.shape[-1] // 2
    return kernel(q, k, cos[:, 0, :, :half], sin[:, 0, :, :half])


def _linear_cross_entropy_triton(hidden, weight, labels, *, softcap, ignore_index, z_loss, reduction):
    from florenz_kernels.linear_cross_entropy import linear_cross_entropy as kernel

    return kernel(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index, z_loss=z_loss,
                  reduction=reduction)


if _triton_importable():
    register_backend("triton", _attention_triton)
    for _op, _fn in (("rms_norm", _rms_norm_triton), ("add_rms_norm", _add_rms_norm_triton),
                     ("geglu", _geglu_triton), ("rope", _rope_triton),
                     ("linear_cross_entropy", _linear_cross_entropy_triton)):
        register_backend("triton", _fn, op=_op)



# ---- decode-time ops: CUDA kernels of csrc/ (extension florenz_fast._C), pure-PyTorch references ---------------
#
# Shapes: B sequences, H query heads, Hk KV heads, Lq new tokens per sequence (1..8), C cache slots, D head dim,
# N = images x beams sequences, S encoder tokens.
#
#   decode_attention(q (B, H, Lq, D), k_cache, v_cache (B, Hk, C, D), cache_lens (B,) int32, scale, softcap,
#                    window) -> (B, H, Lq, D)
#     cache_lens = tokens of each sequence so far, the Lq new ones included (their K/V already written); query i
#     sits at position p_i = len - Lq + i. Slot rule, one rule for linear caches and sliding-window ring buffers:
#     position p lives in slot p % C; slot s holds the largest position pos(s) < len with pos(s) = s (mod C), none
#     if s >= len. Query i sees slot s iff pos(s) <= p_i and (window == 0 or p_i - pos(s) < window). Valid when
#     C >= len (linear) or C >= window + Lq - 1 (ring). Scores scale * q.k, softcap c > 0: c * tanh(s / c),
#     softmax in fp32, out in q's dtype; a row that sees nothing is zeros.
#   cross_decode_attention(q (N, H, Lq, D), k, v (n_images, S, Hk, D) (strided views with a contiguous last dim,
#                          e.g. column slices of decoder.cross_kv's all-layer tensor), image_index (N,) int32,
#                          image_lens (n_images,) int32, scale, softcap) -> (N, H, Lq, D)
#     sequence n reads image image_index[n] (beams share an image's K/V without copies); non-causal over its
#     first image_lens[image] tokens.
#   rope_kv_append(q (B, H, Lq, D), k, v (B, Hk, Lq, D), k_cache, v_cache (B, Hk, C, D), cache_lens (B,) int32,
#                  inv_freq (D/2,) fp32) -> q rotated (B, H, Lq, D)
#     the fused decode-step prologue: RoPE (rotate-half, angle = fp32(position) * inv_freq, the model's Rotary
#     buffer) on the new q and k at positions p_i = len - Lq + i, and rotated k / plain v written into slot p_i % C
#     of the caches (in place).
#
# impl: None = the extension op where it is built (CUDA kernels for CUDA tensors, its CPU implementation for CPU
# tensors), else the reference; "ext" = the extension op (error if not built); "cuda" = the CUDA kernels (error on
# non-CUDA tensors); "torch" = the reference.

_EXT_STATE: dict[str, object] = {}


def extension_status() -> tuple[bool, str]:
    """(loaded, message): whether florenz_fast._C (csrc/) is built and its ops are registered."""
    if "loaded" not in _EXT_STATE:
        import importlib.util

        try:
            spec = importlib.util.find_spec("florenz_fast._C")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin:
            _EXT_STATE.update(loaded=False, message="florenz_fast._C is not built (see README: the CUDA build)")
        else:
            try:
                torch.ops.load_library(spec.origin)  # registers florenz::decode_attention & co. (TORCH_LIBRARY)
                _EXT_STATE.update(loaded=True, message=spec.origin)
            except (OSError, RuntimeError) as e:
                _EXT_STATE.update(loaded=False, message=f"florenz_fast._C failed to load: {e}")
    return bool(_EXT_STATE["loaded"]), str(_EXT_STATE["message"])


def extension_available() -> bool:
    return extension_status()[0]


def _decode_impl(op: str, q: torch.Tensor, impl: str | None) -> str:
    if impl not in (None, "ext", "cuda", "torch"):
        raise ValueError(f"{op}: impl must be None, 'ext', 'cuda' or 'torch', got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "cuda" and not q.is_cuda:
        raise ValueError(f"{op}: impl='cuda' runs the CUDA kernels and needs CUDA tensors, got q on {q.device}")
    loaded, message = extension_status()
    if impl in ("ext", "cuda") and not loaded:
        raise RuntimeError(f"{op}: impl={impl!r} needs the extension: {message}")
    return "ext" if loaded else "torch"


def decode_attention_reference(q, k_cache, v_cache, cache_lens, scale: float, softcap: float = 0.0,
                               window: int = 0) -> torch.Tensor:
    """The definition of decode_attention (see above), in q's dtype (float64 in, float64 math)."""
    B, H, Lq, D = q.shape
    C = k_cache.shape[2]
    lens = cache_lens.to(device=q.device, dtype=torch.long)[:, None]  # (B, 1)
    slots = torch.arange(C, device=q.device)[None]  # (1, C)
    pos = slots + C * torch.div(lens - 1 - slots, C, rounding_mode="floor")  # (B, C), meaningful where s < len
    pq = lens - Lq + torch.arange(Lq, device=q.device)[None]  # (B, Lq)
    visible = (slots < lens)[:, None, :] & (pos[:, None, :] <= pq[..., None])  # (B, Lq, C)
    if window:
        visible &= (pq[..., None] - pos[:, None, :]) < window
    return _attention_dense(q, k_cache, v_cache, scale=scale, softcap=softcap, visible_BLS=visible[:, None],
                            dropout_p=0.0)


def cross_decode_attention_reference(q, k, v, image_index, image_lens, scale: float,
                                     softcap: float = 0.0) -> torch.Tensor:
    """The definition of cross_decode_attention (see above)."""
    idx = image_index.to(device=q.device, dtype=torch.long)
    k_NHSD = k[idx].transpose(1, 2)
    v_NHSD = v[idx].transpose(1, 2)
    lens = image_lens.to(device=q.device, dtype=torch.long)[idx]
    visible = torch.arange(k.shape[1], device=q.device)[None] < lens[:, None]  # (N, S)
    return _attention_dense(q, k_NHSD, v_NHSD, scale=scale, softcap=softcap, visible_BLS=visible[:, None, None],
                            dropout_p=0.0)


def rope_kv_append_reference(q, k, v, k_cache, v_cache, cache_lens, inv_freq) -> torch.Tensor:
    """The definition of rope_kv_append (see above), computed as the model's Rotary does: cos / sin of the fp32
    angles cast to the activation dtype, rotation in that dtype (fp64 angles' cos / sin for fp64 tensors)."""
    B, H, Lq, D = q.shape
    C = k_cache.shape[2]
    pos = cache_lens.to(device=q.device, dtype=torch.long)[:, None] - Lq + torch.arange(Lq, device=q.device)
    angles = pos.float()[..., None] * inv_freq.float()  # (B, Lq, D/2), fp32 as in Rotary.cos_sin
    emb = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, Lq, D)
    if q.dtype == torch.float64:
        emb = emb.double()
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    q_rot = q * cos + rot(q) * sin
    k_rot = k * cos + rot(k) * sin
    b_idx = torch.arange(B, device=q.device)[:, None].expand(B, Lq)
    slot = pos % C
    k_cache[b_idx, :, slot] = k_rot.transpose(1, 2).to(k_cache.dtype)  # (B, Lq, Hk, D) into [b, :, slot]
    v_cache[b_idx, :, slot] = v.transpose(1, 2).to(v_cache.dtype)
    return q_rot


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale: float, softcap: float = 0.0, window: int = 0,
                     impl: str | None = None) -> torch.Tensor:
    """Attention of the Lq newest tokens over the self-attention KV cache (linear or ring buffer); see above."""
    if _decode_impl("decode_attention", q, impl) == "torch":
        return decode_attention_reference(q, k_cache, v_cache, cache_lens, scale, softcap, window or 0)
    return torch.ops.florenz.decode_attention(q, k_cache, v_cache, cache_lens, float(scale), float(softcap),
                                              int(window or 0))


def cross_decode_attention(q, k, v, image_index, image_lens, *, scale: float, softcap: float = 0.0,
                           impl: str | None = None) -> torch.Tensor:
    """Attention of the Lq newest tokens over each sequence's image K/V (beams share it); see above."""
    if _decode_impl("cross_decode_attention", q, impl) == "torch":
        return cross_decode_attention_reference(q, k, v, image_index, image_lens, scale, softcap)
    return torch.ops.florenz.cross_decode_attention(q, k, v, image_index, image_lens, float(scale), float(softcap))


def rope_kv_append(q, k, v, k_cache, v_cache, cache_lens, inv_freq, *, impl: str | None = None) -> torch.Tensor:
    """RoPE on the new q / k and the KV-cache append in one step; returns the rotated q (caches in place)."""
    if _decode_impl("rope_kv_append", q, impl) == "torch":
        return rope_kv_append_reference(q, k, v, k_cache, v_cache, cache_lens, inv_freq)
    return torch.ops.florenz.rope_kv_append(q, k, v, k_cache, v_cache, cache_lens, inv_freq)
