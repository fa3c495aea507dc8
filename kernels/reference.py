"""The pure-torch reference of every op: the definition each fast path (Triton kernel, CUDA kernel, plain-PyTorch
backend) is tested against, written once. `florenz_fast.ops` registers these as its `torch` backend, each kernel
module re-exports its own (`florenz_kernels.rms_norm.rms_norm_reference` is `rms_norm_reference` below), and the
tests run them in float64 (DESIGN.md 3).

Torch only, never triton: Triton fixes interpreted vs compiled when a kernel module is imported, and the tests switch
TRITON_INTERPRET=1 on before they import one, so a reference that pulled in triton or a kernel module would fix that
choice for whoever imports it first (florenz_fast.ops, a test); and the ops `torch` backend must work where triton
is absent.

Shape legend: B batch, H query heads, Hk key/value heads, L query length, S key length, D head dim, T / Tk packed
query / key tokens, N packed segments, V vocabulary, C channels, d model width.

Precision: math in torch.promote_types(input dtype, float32), i.e. fp32 for fp16/bf16/fp32 inputs and float64 for
float64 ones (a reference that ran float64 in fp32 would hide a kernel's error below its own ~1e-7), cast back to the
input dtype where the op returns the input's dtype. Attention (conventions: florenz_fast.ops):
  scores = (q @ k^T) * scale; softcap c > 0: c * tanh(scores / c); masks; softmax in the math dtype, probabilities
  cast back to q's dtype; out = probs @ v. GQA: query head h reads kv head h // (H // Hk). causal: bottom-right
  aligned (query i of L sits at key position i + S - L); window W: additionally p(i) - j < W. A row that sees no key
  is zeros (and lse -inf).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "softcap", "cu_seqlens_from_lengths", "positions_from_cu_seqlens", "segments_from_cu_seqlens", "visibility_mask",
    "packed_visibility", "check_attention_inputs",
    "attention_block", "attention_reference", "softcap_attention_reference", "rms_norm_reference",
    "add_rms_norm_reference", "geglu_reference", "rotate_half", "rotary", "rope_reference", "rope_full_reference",
    "linear_cross_entropy_reference", "image_tokens_reference",
]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ---- packing helpers ---------------------------------------------------------------------------------------


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """c * tanh(x / c); identity for cap == 0."""
    return torch.tanh(x / cap) * cap if cap else x


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    """(N+1,) int32 cumulative lengths [0, l0, l0 + l1, ...]."""
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Position of each packed token inside its own segment: [0..len0-1, 0..len1-1, ...] (int64). Pass `total`
    (the packed length, from a shape): without it cu_seqlens[-1] is read back to the host (a device sync)."""
    return segments_from_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]) if total is None else total)[1]


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, position inside the segment) of each of the `total` packed tokens, int64; zero-length segments
    own no token. No device->host read: repeat_interleave with output_size (DESIGN.md 13)."""
    cu = cu_seqlens.long()
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1],
                                  output_size=total)
    return seg, torch.arange(total, device=cu.device) - cu[:-1][seg]


# ---- attention ---------------------------------------------------------------------------------------------


def visibility_mask(L: int, S: int, *, causal: bool, window: int | None, device=None) -> torch.Tensor | None:
    """(L, S) bool, True where query i may see key j under the causal/window convention; None = all."""
    if not causal:
        return None
    pos_q = torch.arange(L, device=device)[:, None] + (S - L)
    pos_k = torch.arange(S, device=device)[None, :]
    visible = pos_k <= pos_q
    if window:
        visible &= (pos_q - pos_k) < window
    return visible


def check_attention_inputs(q, k, v, *, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                           name: str = "attention", check_values: bool = True) -> None:
    """ValueError naming the problem for a call outside the attention conventions (layouts, GQA, masks). With
    `check_values`, CPU cu_seqlens are also read on the host (start at 0, never decrease, end at the token
    counts); CUDA ones never are (a device sync per call: it starved the GPU in packed training). ops.attention
    passes check_values=False when the caller gave max_seqlen_q and max_seqlen_k: host metadata, so cu_seqlens
    were built and checked on the host (packing.host_layout, Layout.from_lengths) and a static step reads nothing."""
    cu_q, cu_k = cu_seqlens_q, cu_seqlens_k
    packed = cu_q is not None or cu_k is not None
    if packed and (cu_q is None or cu_k is None):
        raise ValueError(f"{name}: packed input needs both cu_seqlens_q and cu_seqlens_k")
    want = 3 if packed else 4
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "(T, H, D)" if packed else "(B, H, L, D)"
            raise ValueError(f"{name}: {arg} must be {layout} for this layout, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    hq, hk = q.shape[1], k.shape[1]  # heads sit in dim 1 in both layouts
    if hq % hk:
        raise ValueError(f"{name}: {hq} query heads are not a multiple of {hk} key/value heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: head dims differ, q {q.shape[-1]} vs k {k.shape[-1]}")
    if window and not causal:
        raise ValueError(f"{name}: a sliding window is only defined for causal attention")
    if packed:
        if key_padding_mask is not None:
            raise ValueError(f"{name}: key_padding_mask is for the padded layout; packed input uses cu_seqlens")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"{name}: cu_seqlens_q has {cu_q.numel()} entries, cu_seqlens_k {cu_k.numel()}")
        # Left to whoever builds the batch once on CUDA (Florenz.decode / Layout.from_lengths check lengths on the
        # host): reading cu_seqlens here is a device sync in every attention call of every layer.
        if not check_values or cu_q.is_cuda or cu_k.is_cuda:
            return
        for arg, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
            if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
                raise ValueError(f"{name}: {arg} must start at 0 and never decrease, got {cu.tolist()}")
        if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) != k.shape[0]:
            raise ValueError(f"{name}: cu_seqlens end at {int(cu_q[-1])}/{int(cu_k[-1])} but q has "
                             f"{q.shape[0]} and k has {k.shape[0]} tokens")
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"{name}: batch sizes differ, q {q.shape[0]} vs k {k.shape[0]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"{name}: key_padding_mask must be (B, S) = {(k.shape[0], k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")


def attention_block(q_BHLD, k_BHSD, v_BHSD, *, scale, softcap, visible_BLS, dropout_p=0.0, return_lse=False,
                    dropout=None):
    """The attention math on one padded block; `visible_BLS` broadcastable to (B, H, L, S) or None (all visible).
    Returns out (B, H, L, D), and with `return_lse` also lse (B, H, L) in the math dtype. `dropout(probs, p)`
    drops attention probabilities when dropout_p > 0 (default: torch's F.dropout)."""
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
    probs = torch.softmax(scores, dim=-1, dtype=_math_dtype(scores.dtype))
    if visible_BLS is not None:  # rows that see nothing: softmax gave NaN; define them as zeros
        probs = probs.masked_fill(~visible_BLS.any(-1, keepdim=True), 0.0)
    probs = probs.to(q_BHLD.dtype)
    if dropout_p:
        probs = (dropout or F.dropout)(probs, dropout_p)
    out = torch.matmul(probs, v_BHSD)
    if not return_lse:
        return out
    return out, torch.logsumexp(scores.to(_math_dtype(scores.dtype)), dim=-1)


def attention_reference(q, k, v, *, scale, softcap=0.0, causal=False, window=None, key_padding_mask=None,
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                        return_lse=False):
    """ops.attention's definition (its `torch` backend), padded or packed (layouts: florenz_fast.ops). With
    `return_lse` also the log-sum-exp of the visible scores: (B, H, L) padded, (H, T) packed, -inf for rows that
    see no key."""
    if cu_seqlens_q is None:
        L, S = q.shape[2], k.shape[2]
        visible = visibility_mask(L, S, causal=causal, window=window, device=q.device)
        if key_padding_mask is not None:
            pad = key_padding_mask[:, None, None, :].bool()
            visible = pad if visible is None else (visible[None, None] & pad)
        return attention_block(q, k, v, scale=scale, softcap=softcap, visible_BLS=visible, dropout_p=dropout_p,
                               return_lse=return_lse)
    # packed: the whole row as one block under a block-diagonal (T, Tk) mask, query segment n seeing key segment n
    # under the same causal / window rule. Segment ids and positions come from cu_seqlens and the shapes
    # (repeat_interleave with output_size), so nothing is read back to the host (DESIGN.md 13). A masked key adds
    # an exact 0 to the softmax sums, so this is the per-segment definition (float64 to rounding); zero-length
    # segments own no rows, and the queries of a segment without keys see nothing: zeros (and lse -inf).
    visible = packed_visibility(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal=causal, window=window)
    res = attention_block(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale,
                          softcap=softcap, visible_BLS=visible, dropout_p=dropout_p, return_lse=return_lse)
    if return_lse:
        return res[0][0].transpose(0, 1), res[1][0]
    return res[0].transpose(0, 1)


def packed_visibility(cu_seqlens_q, cu_seqlens_k, T: int, Tk: int, *, causal: bool, window: int | None):
    """(T, Tk) bool: packed query t may see packed key s (same segment; causal bottom-right aligned per segment;
    window). No device->host read."""
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


def softcap_attention_reference(q, k, v, *, softcap: float = 0.0, scale: float | None = None, causal: bool = True,
                                window: int | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                                key_padding_mask=None, **_ignored):
    """florenz_kernels.softcap_attention's (out, lse) with its defaults (causal, scale D^-0.5): attention_reference.
    Materialises the scores (tests and small shapes only)."""
    return attention_reference(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                               softcap=softcap or 0.0, causal=causal, window=window,
                               key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, return_lse=True)


# ---- decoder fusions ---------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (1 + w) in the math dtype, cast to x's."""
    xm = x.to(_math_dtype(x.dtype))
    out = xm * torch.rsqrt(xm.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.to(out.dtype))).type_as(x)


def add_rms_norm_reference(residual, y, weight, eps, *, scale=None, next_weight=None, next_eps=None):
    """(h, next): h = residual + scale * rms_norm(y, weight) (scale a 1-element tensor or None), next =
    rms_norm(h, next_weight, next_eps or eps) or None. Dtypes promote as written (an fp32 residual and gate with
    an fp16 y, as under autocast, give an fp32 h)."""
    n = rms_norm_reference(y, weight, eps)
    h = residual + (n if scale is None else scale * n)
    return h, (None if next_weight is None else rms_norm_reference(h, next_weight, eps if next_eps is None
                                                                    else next_eps))


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the halves of the last dim (the rotate-half RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with full-width tables broadcastable to x (their two halves equal)."""
    return x * cos + rotate_half(x) * sin


def rope_full_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """ops.rope's definition: q (B, H, L, D), k (B, Hk, L, D), cos / sin (B or 1, 1, L, D) as Rotary.cos_sin builds
    them; out of place, in the dtype promoted from q / k and the tables."""
    return rotary(q, cos, sin), rotary(k, cos, sin)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """florenz_kernels.rope.rope_'s layouts, out of place: q / k padded (B, H, L, D) or packed (T, H, D), cos / sin
    the half-width tables (B or 1, L, D/2) or (L, D/2) (packed: (T, D/2)); dtype promoted from q and the tables."""
    packed = q.dim() == 3
    q4 = q.transpose(0, 1)[None] if packed else q
    k4 = k.transpose(0, 1)[None] if packed else k
    c = (cos[None] if cos.dim() == 2 else cos)[:, None]
    s = (sin[None] if sin.dim() == 2 else sin)[:, None]
    c, s = torch.cat([c, c], -1), torch.cat([s, s], -1)
    qo, ko = rope_full_reference(q4, k4, c, s)
    if packed:
        qo, ko = qo[0].transpose(0, 1), ko[0].transpose(0, 1)
    return qo, ko


def linear_cross_entropy_reference(hidden, weight, labels, *, softcap: float = 30.0, ignore_index: int = -100,
                                   z_loss: float = 0.0, reduction: str = "mean", **_ignored) -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight^T) against labels, unfused (materialises the logits), in the math
    dtype after the softcap: hidden (..., D), weight (V, D), labels (...). reduction "none" -> (...) per-token losses
    (0 where labels == ignore_index), "sum", or "mean" over the non-ignored tokens (NaN if there are none);
    "sum+none" -> (the sum, the per-token losses without gradient). z_loss > 0 adds z_loss * logsumexp^2 per
    token."""
    z = F.linear(hidden, weight)
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    z = z.to(_math_dtype(z.dtype))
    lse = torch.logsumexp(z, -1)
    valid = labels != ignore_index
    picked = z.gather(-1, torch.where(valid, labels, 0).long()[..., None])[..., 0]
    loss = torch.where(valid, lse - picked + z_loss * lse * lse, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "sum+none":
        return loss.sum(), loss.detach()
    return loss.sum() / valid.sum()


def image_tokens_reference(x_BNC, pos_NC, weight_dC, ln_weight, ln_bias, eps: float = 1e-5):
    """The image-token projection (SPEC §2), unfused: add the positions, prepend the mean token, project (no bias),
    LayerNorm. x (B, N, C), pos (N, C), weight (d, C), ln_weight / ln_bias (d,) -> (B, 1 + N, d)."""
    y = x_BNC + pos_NC
    y = torch.cat([y.mean(dim=1, keepdim=True), y], dim=1)
    return F.layer_norm(F.linear(y, weight_dC), (weight_dC.shape[0],), ln_weight, ln_bias, eps)
