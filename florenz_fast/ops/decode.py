"""Decode-time ops: the CUDA kernels of csrc/ (extension florenz_fast._C, loaded here) on the ops backend chain,
with pure-PyTorch references (the definitions; their attention math and rotation are florenz_kernels.reference's).

Shapes: B sequences, H query heads, Hk KV heads, Lq new tokens per sequence (1..8), C cache slots, D head dim,
N = images x beams sequences, S encoder tokens.

  decode_attention(q (B, H, Lq, D), k_cache, v_cache (B, Hk, C, D), cache_lens (B,) int32, scale, softcap,
                   window) -> (B, H, Lq, D)
    cache_lens = tokens of each sequence so far, the Lq new ones included (their K/V already written); query i
    sits at position p_i = len - Lq + i. Slot rule, one rule for linear caches and sliding-window ring buffers:
    position p lives in slot p % C; slot s holds the largest position pos(s) < len with pos(s) = s (mod C), none
    if s >= len. Query i sees slot s iff pos(s) <= p_i and (window == 0 or p_i - pos(s) < window). Valid when
    C >= len (linear) or C >= window + Lq - 1 (ring). Scores scale * q.k, softcap c > 0: c * tanh(s / c),
    softmax in fp32, out in q's dtype; a row that sees nothing is zeros.
  cross_decode_attention(q (N, H, Lq, D), k, v (n_images, S, Hk, D) (strided views with a contiguous last dim,
                         e.g. column slices of decoder.cross_kv's all-layer tensor), image_index (N,) int32,
                         image_lens (n_images,) int32, scale, softcap) -> (N, H, Lq, D)
    sequence n reads image image_index[n] (beams share an image's K/V without copies); non-causal over its
    first image_lens[image] tokens.
  rope_kv_append(q (B, H, Lq, D), k, v (B, Hk, Lq, D), k_cache, v_cache (B, Hk, C, D), cache_lens (B,) int32,
                 inv_freq (D/2,) fp32) -> q rotated (B, H, Lq, D)
    the fused decode-step prologue: RoPE (rotate-half, angle = fp32(position) * inv_freq, the model's Rotary
    buffer) on the new q and k at positions p_i = len - Lq + i, and rotated k / plain v written into slot p_i % C
    of the caches (in place).
  reorder_rows_(tensors [(N, ...)], index (N,) int64) -> None
    every tensor's row n becomes its row index[n], in place (the beam reorder of the KV caches: the buffers keep
    their addresses, as a CUDA graph needs). One opaque op (florenz::reorder_rows_) rather than
    `t.copy_(t.index_select(0, index))` in the traced step: inductor (torch 2.14, CPU) fused that gather-and-write-
    back with the decode step's cache append into a kernel that read rows it had already overwritten, and beam
    search under torch.compile chose other tokens (tests/test_search_device.py::test_inductor_step_equals_eager).
  cached_attention(q (N, H, 1, D), k_cache, v_cache (N, Hk, C, D), pos int64 0-dim or (N,), scale, softcap,
                   dropout_p)
    -> (N, H, 1, D): one generation step of self-attention over a static KV cache (florenz_fast.modules.KVCache)
    whose slots 0..min(pos, C - 1) are written (a ring buffer of C = W slots is a window of W): non-causal over
    those slots. `pos` 0-dim: one position for every row; (N,): row n at its own position pos[n] (continuous
    batching), sees its slots 0..min(pos[n], C - 1). `ext` runs decode_attention's CUDA kernel (cache_lens =
    pos + 1, per row: that kernel already takes one length per sequence) for CUDA fp16/bf16 tensors with head dim
    64/128/256 and no dropout; `torch` is ops.attention with the slot mask, on the call's chain.

Backends: `torch` (the references) and `ext`: the extension's ops `torch.ops.florenz.*` (its CUDA kernels for
CUDA tensors, its CPU implementation for CPU tensors; cached_attention only for CUDA); Unsupported where the
extension is not built. Without a per-call `backend=`, these ops run the chain "ext+<engine chain>": the extension
wherever it is built, whatever the engine backend (decode has no Triton kernels). backend="torch" forces the
reference, backend="ext" the extension (it falls back to the reference only where the extension is not built).
"""

from __future__ import annotations

import torch

from florenz_kernels.reference import attention_block, rotary

from .attention import attention
from .registry import Unsupported, dispatch, get_backend, register_backend

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


def _decode_chain(backend: str | None) -> str:
    return backend if backend is not None else "ext+" + get_backend()


def _need_extension(op: str) -> None:
    loaded, message = extension_status()
    if not loaded:
        raise Unsupported(f"{op}: the `ext` backend needs the extension: {message}")


# ---- references (the definitions) ------------------------------------------------------------------------------


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
    return attention_block(q, k_cache, v_cache, scale=scale, softcap=softcap, visible_BLS=visible[:, None])


def cross_decode_attention_reference(q, k, v, image_index, image_lens, scale: float,
                                     softcap: float = 0.0) -> torch.Tensor:
    """The definition of cross_decode_attention (see above)."""
    idx = image_index.to(device=q.device, dtype=torch.long)
    k_NHSD = k[idx].transpose(1, 2)
    v_NHSD = v[idx].transpose(1, 2)
    lens = image_lens.to(device=q.device, dtype=torch.long)[idx]
    visible = torch.arange(k.shape[1], device=q.device)[None] < lens[:, None]  # (N, S)
    return attention_block(q, k_NHSD, v_NHSD, scale=scale, softcap=softcap, visible_BLS=visible[:, None, None])


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
    q_rot, k_rot = rotary(q, cos, sin), rotary(k, cos, sin)
    b_idx = torch.arange(B, device=q.device)[:, None].expand(B, Lq)
    slot = pos % C
    k_cache[b_idx, :, slot] = k_rot.transpose(1, 2).to(k_cache.dtype)  # (B, Lq, Hk, D) into [b, :, slot]
    v_cache[b_idx, :, slot] = v.transpose(1, 2).to(v_cache.dtype)
    return q_rot


def _grouped_decode_attention(q, k_cache, v_cache, pos, *, scale, softcap):
    """cached_attention's math without ops.attention's GQA copies: the G = H / Hk query heads of a KV head are G
    query rows against that head's cache ((N, Hk, G, D) @ (N, Hk, D, C)), so the (N, H, C, D) repeat of both caches
    (2 copies per layer per step) is never built. Slot s is visible iff s <= pos (every row sees slot 0); a (N,)
    `pos` is one position per row."""
    N, H, _, D = q.shape
    Hk, C = k_cache.shape[1], k_cache.shape[2]
    q_NKGD = q.reshape(N, Hk, H // Hk, D)
    scores = torch.matmul(q_NKGD, k_cache.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    # pos.view(-1, 1, 1, 1): (1, 1, 1, 1) for the shared position, (N, 1, 1, 1) per row: the same op either way
    scores = scores.masked_fill(torch.arange(C, device=pos.device) > pos.view(-1, 1, 1, 1), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    return torch.matmul(probs, v_cache).view(N, H, 1, D)


def _cached_attention_torch(q, k_cache, v_cache, pos, *, scale, softcap, dropout_p, backend):
    N, C = q.shape[0], k_cache.shape[2]
    # a chain whose attention is the reference (torch, or ext, which has no ops.attention): the copy-free math
    if not dropout_p and set((backend or get_backend()).split("+")) <= {"torch", "ext"}:
        return _grouped_decode_attention(q, k_cache, v_cache, pos, scale=scale, softcap=softcap)
    valid = (torch.arange(C, device=pos.device) <= pos.view(-1, 1)).expand(N, C)  # pos 0-dim or (N,)
    return attention(q, k_cache, v_cache, key_padding_mask=valid, causal=False, scale=scale, softcap=softcap,
                     dropout_p=dropout_p, backend=backend)


# ---- `ext`: the extension's ops ----------------------------------------------------------------------------------


def _decode_attention_ext(q, k_cache, v_cache, cache_lens, *, scale, softcap, window):
    _need_extension("decode_attention")
    return torch.ops.florenz.decode_attention(q, k_cache, v_cache, cache_lens, float(scale), float(softcap),
                                              int(window or 0))


def _cross_decode_attention_ext(q, k, v, image_index, image_lens, *, scale, softcap):
    _need_extension("cross_decode_attention")
    return torch.ops.florenz.cross_decode_attention(q, k, v, image_index, image_lens, float(scale), float(softcap))


def _rope_kv_append_ext(q, k, v, k_cache, v_cache, cache_lens, inv_freq):
    _need_extension("rope_kv_append")
    return torch.ops.florenz.rope_kv_append(q, k, v, k_cache, v_cache, cache_lens, inv_freq)


def _cached_attention_ext(q, k_cache, v_cache, pos, *, scale, softcap, dropout_p, backend):
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not dropout_p
            and q.shape[-1] in (64, 128, 256)):
        raise Unsupported("the CUDA flash-decoding kernel: CUDA fp16/bf16, head dim 64/128/256, no dropout")
    # the same slot rule (position p in slot p % C): every written slot is visible, no key mask; a (N,) `pos`
    # (continuous batching) is one length per row, which the kernel takes as it is (cache_lens is per sequence)
    lens = (pos + 1).to(torch.int32).expand(q.shape[0])
    return _decode_attention_ext(q, k_cache, v_cache, lens, scale=scale, softcap=softcap or 0.0, window=0)


register_backend("torch", decode_attention_reference, op="decode_attention")
register_backend("torch", cross_decode_attention_reference, op="cross_decode_attention")
register_backend("torch", rope_kv_append_reference, op="rope_kv_append")
register_backend("torch", _cached_attention_torch, op="cached_attention")
register_backend("ext", _decode_attention_ext, op="decode_attention")
register_backend("ext", _cross_decode_attention_ext, op="cross_decode_attention")
register_backend("ext", _rope_kv_append_ext, op="rope_kv_append")
register_backend("ext", _cached_attention_ext, op="cached_attention")


# ---- the beam reorder ------------------------------------------------------------------------------------------


@torch.library.custom_op("florenz::reorder_rows_", mutates_args=("tensors",))
def reorder_rows_(tensors: list[torch.Tensor], index: torch.Tensor) -> None:
    """Row n of every tensor takes its row index[n], in place (see the module doc)."""
    for t in tensors:
        t.copy_(t.index_select(0, index))


@reorder_rows_.register_fake
def _(tensors, index):
    return None


# ---- the API -------------------------------------------------------------------------------------------------


def decode_attention(q, k_cache, v_cache, cache_lens, *, scale: float, softcap: float = 0.0, window: int = 0,
                     backend: str | None = None) -> torch.Tensor:
    """Attention of the Lq newest tokens over the self-attention KV cache (linear or ring buffer); see above."""
    return dispatch("decode_attention", _decode_chain(backend), q, k_cache, v_cache, cache_lens, scale=scale,
                    softcap=softcap, window=window or 0)


def cross_decode_attention(q, k, v, image_index, image_lens, *, scale: float, softcap: float = 0.0,
                           backend: str | None = None) -> torch.Tensor:
    """Attention of the Lq newest tokens over each sequence's image K/V (beams share it); see above."""
    return dispatch("cross_decode_attention", _decode_chain(backend), q, k, v, image_index, image_lens, scale=scale,
                    softcap=softcap)


def rope_kv_append(q, k, v, k_cache, v_cache, cache_lens, inv_freq, *, backend: str | None = None) -> torch.Tensor:
    """RoPE on the new q / k and the KV-cache append in one step; returns the rotated q (caches in place)."""
    return dispatch("rope_kv_append", _decode_chain(backend), q, k, v, k_cache, v_cache, cache_lens, inv_freq)


def cached_attention(q, k_cache, v_cache, pos, *, scale: float, softcap: float = 0.0, dropout_p: float = 0.0,
                     backend: str | None = None) -> torch.Tensor:
    """One decode step's self-attention over a static KV cache written up to position `pos` (0-dim: every row;
    (N,): per row; see above)."""
    return dispatch("cached_attention", _decode_chain(backend), q, k_cache, v_cache, pos, scale=scale,
                    softcap=softcap, dropout_p=dropout_p, backend=backend)
