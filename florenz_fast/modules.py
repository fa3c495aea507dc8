"""Small building blocks shared by the model parts: the batch layout, the head-splitting attention call, and the
all-layer cross-attention K/V projection."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops


@dataclass
class Layout:
    """How a batch of token sequences is laid out.

    padded: x is (B, L, ...); `mask` (B, L) bool marks real tokens (None: all real).
    packed: x is (1, T, ...) holding N sequences back to back; `cu_seqlens` (N+1,) int32 gives their bounds,
    `max_seqlen` (a Python int) bounds their lengths; `pos_BL` (1, T) int64 the position ids, when the loader
    computed them on the host (static batches: the pad segment's positions are 0, not 0..len-1).
    `positions_checked`: the position ids were checked against the learned-position tables on the host
    (packing.check_limits), so the embedding skips its check; `max_position` (Python int): 1 + the largest
    position id, when known on the host (the check then reads no tensor).
    """

    mask: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    pos_BL: torch.Tensor | None = None
    positions_checked: bool = False
    max_position: int | None = None

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @staticmethod
    def from_lengths(lengths: list[int], device=None) -> "Layout":
        return Layout(cu_seqlens=ops.cu_seqlens_from_lengths(lengths, device), max_seqlen=max(lengths),
                      max_position=max(lengths))

    def positions(self, length: int, device=None) -> torch.Tensor:
        """Token positions: (1, T) restarting per packed segment, or (1, L) = 0..L-1 for right-padded input."""
        if self.pos_BL is not None:
            return self.pos_BL
        if self.packed:  # no device->host read: the total comes from the shape, not from cu_seqlens[-1]
            return ops.positions_from_cu_seqlens(self.cu_seqlens, length)[None]
        return torch.arange(length, device=device)[None]

    def position_bound(self, length: int) -> int | None:
        """1 + the largest position id if known on the host: padded input from its shape, packed from
        `max_position`; None: unknown (the caller reads the positions)."""
        if not self.packed:
            return length
        return self.max_position


def attend(q_BLX, k_BSX, v_BSX, *, heads: int, kv_heads: int, q_layout: Layout, k_layout: Layout,
           rope=None, **kw) -> torch.Tensor:
    """Split heads, apply `rope(q, k)` if given (on (B, H, L, D) tensors), call ops.attention, merge heads."""
    B, L, _ = q_BLX.shape
    S = k_BSX.shape[1]
    q = q_BLX.view(B, L, heads, -1).transpose(1, 2)
    k = k_BSX.view(B, S, kv_heads, -1).transpose(1, 2)
    v = v_BSX.view(B, S, kv_heads, -1).transpose(1, 2)
    if rope is not None:
        q, k = rope(q, k)
    if k_layout.packed:
        if B != 1:
            raise ValueError(f"packed input must have batch dimension 1, got {B}")
        out = ops.attention(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
            cu_seqlens_q=q_layout.cu_seqlens, cu_seqlens_k=k_layout.cu_seqlens,
            max_seqlen_q=q_layout.max_seqlen, max_seqlen_k=k_layout.max_seqlen, **kw,
        )
        return out.reshape(1, L, -1)
    out = ops.attention(q, k, v, key_padding_mask=k_layout.mask, **kw)
    return out.transpose(1, 2).reshape(B, L, -1)


def project_kv_all_layers(x_BSd: torch.Tensor, attns: list[nn.Module]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K and V projections of every attention module in `attns` (each with nn.Linear `k_proj` / `v_proj`,
    biases optional) from one GEMM over their concatenated weights, instead of 2 x len(attns) small ones.

    Returns one (k, v) pair per module, each (B, S, out) and equal to (attn.k_proj(x), attn.v_proj(x)). They
    are column slices of one (B, S, n_layers * 2 * out) result, so every token's K and V for all layers sit
    in one contiguous row; ops.attention's backends take such strided views as they are (last dim
    contiguous), and generation keeps the whole tensor as the cross-attention cache. Autograd splits the
    weight gradient back into the per-layer parameters (one GEMM for all of them as well).
    """
    weights = [w for a in attns for w in (a.k_proj.weight, a.v_proj.weight)]
    biases = [b for a in attns for b in (a.k_proj.bias, a.v_proj.bias)]
    bias = None if biases[0] is None else torch.cat(biases)
    kv = F.linear(x_BSd, torch.cat(weights), bias)
    pieces = kv.split([w.shape[0] for w in weights], dim=-1)
    return [(pieces[2 * i], pieces[2 * i + 1]) for i in range(len(attns))]


# ---- static self-attention KV cache for decoding (florenz_fast.generate) --------------------------------

@dataclass
class KVCache:
    """One layer's preallocated self-attention cache for single-token decoding.

    k, v: (N, Hk, C, D), N = batch x beams. A global layer holds C = max_len slots; a sliding-window layer of
    window W only C = min(W, max_len): a ring buffer where position p lives in slot p % C. Keys are stored with
    RoPE already applied. A decode query at position p sees exactly the slots written so far (all of them once
    p >= C - 1), which for a ring of C = W slots are positions p - W + 1 .. p: the window. So decoding attends
    non-causally over the valid slots with a key mask, whatever their order in the ring.
    """

    k: torch.Tensor
    v: torch.Tensor

    @staticmethod
    def allocate(n: int, kv_heads: int, slots: int, head_dim: int, dtype, device) -> "KVCache":
        shape = (n, kv_heads, slots, head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def reset_rows_(self, start: int, stop: int) -> None:
        """Rows start..stop-1 zeroed (continuous batching: a new request takes those rows). Not needed for
        correctness (a row at position p sees only slots <= p, which it wrote itself), but it leaves no stale keys."""
        self.k[start:stop].zero_()
        self.v[start:stop].zero_()

    def reorder_(self, index_N: torch.Tensor) -> None:
        """Row n takes the cache of row index_N[n] (beam search), in place: the buffers keep their addresses."""
        self.k.copy_(self.k.index_select(0, index_N))
        self.v.copy_(self.v.index_select(0, index_N))


def attend_cached(q_N1X, k_N1X, v_N1X, cache: KVCache, pos: torch.Tensor, *, heads: int, kv_heads: int,
                  rope=None, **kw) -> torch.Tensor:
    """One decode step of self-attention: write this token's (roped) k/v into its slot, attend over the written
    slots through ops.cached_attention (non-causal; the CUDA decode kernel where it applies). `pos` is an int64
    tensor on the device (no host sync, so the step can be captured in a CUDA graph): 0-dim, one position shared
    by every row, or (N,), each row at its own position (continuous batching: a row whose request just took the
    slot restarts at 0; its slots above `pos` hold the previous request's keys, which the slot rule never shows).
    Returns (N, 1, heads * D)."""
    N = q_N1X.shape[0]
    q = q_N1X.view(N, 1, heads, -1).transpose(1, 2)
    k = k_N1X.view(N, 1, kv_heads, -1).transpose(1, 2)
    v = v_N1X.view(N, 1, kv_heads, -1).transpose(1, 2)
    if rope is not None:
        q, k = rope(q, k)
    C = cache.slots
    if pos.dim() == 0:
        slot = torch.remainder(pos, C).view(1)
        cache.k.index_copy_(2, slot, k.to(cache.k.dtype))
        cache.v.index_copy_(2, slot, v.to(cache.v.dtype))
    else:  # per-row positions: row n writes its slot pos[n] % C
        slot = torch.remainder(pos, C).view(N, 1, 1, 1).expand(N, kv_heads, 1, k.shape[-1])
        cache.k.scatter_(2, slot, k.to(cache.k.dtype))
        cache.v.scatter_(2, slot, v.to(cache.v.dtype))
    out = ops.cached_attention(q, cache.k, cache.v, pos, **kw)
    return out.transpose(1, 2).reshape(N, 1, -1)


# ---- the cached decode step's per-call context ----------------------------------------------------------------


@dataclass
class StepLayer:
    """What one decoder layer's cached step reads besides its self-attention cache, built once per generation
    (decoder.step_layers), outside the step: weights it would otherwise re-read piece by piece every step are
    concatenated here, so a step runs one GEMM where it ran two or three. Built from the parameters as they are
    when generation starts (generation never trains; a training step changes the parameters, and the next
    generation builds a new context).

    cross_k / cross_v (B, Hk, S, D) contiguous: the layer's cross-attention keys / values per image (the step's
    grouped cross-attention reads them as they are, no per-step copy); w_qkv (H*D + 2*Hk*D, d) and b_qkv (or None):
    the self-attention q | k | v projection; w_up (2 * ffn, d) or None: the MLP's gate | up projection (Gemma);
    gate () or None: tanh(encoder_attn_gate) (Gemma); norms: the layer's RMSNorm weights as 1 + w (Gemma), for
    the step's norms on the CPU (the reference's math, without the ops layer's casts and dispatch)."""

    cross_k: torch.Tensor
    cross_v: torch.Tensor
    w_qkv: torch.Tensor
    b_qkv: torch.Tensor | None = None
    w_up: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    norms: tuple[torch.Tensor, ...] = ()


def cross_heads(kv_BSX: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, S, Hk * D) (a strided column slice of decoder.cross_kv's tensor) -> contiguous (B, Hk, S, D)."""
    B, S, _ = kv_BSX.shape
    return kv_BSX.view(B, S, kv_heads, -1).transpose(1, 2).contiguous()


def cross_attend_step(q_N1X: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, mask_BS, *, heads: int,
                      beams: int, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Cross-attention of one new token per row (N = B * beams rows, batch-major) over its image's K/V (B, Hk, S, D):
    the beams x (H / Hk) query heads of a KV head are that many query rows against its keys, one batched matmul per
    product, no copy of K/V. `mask_BS` (B, S) bool (None: every key real); each image has a real key. The math of
    ops.attention's reference (scores in q's dtype, softcap, softmax in at least fp32). Returns (N, 1, heads * D)."""
    B, Hk, S, D = k_BKSD.shape
    G = heads // Hk
    q = q_N1X.view(B, beams, Hk, G, D).transpose(1, 2).reshape(B, Hk, beams * G, D)
    scores = torch.matmul(q, k_BKSD.transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask_BS is not None:
        scores = scores.masked_fill(~mask_BS[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    out = torch.matmul(probs, v_BKSD)  # (B, Hk, beams * G, D)
    return out.view(B, Hk, beams, G, D).transpose(1, 2).reshape(B * beams, 1, heads * D)
