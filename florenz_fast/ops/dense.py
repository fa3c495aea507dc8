"""`dense` and `sdpa`: plain-PyTorch attention backends; packed batches are gathered into one padded batch (one
gather in, one out) instead of the reference's (T, Tk) block-diagonal mask; no device->host read when the caller
passes max_seqlen_q / max_seqlen_k (the padded widths).

  dense  the reference math (florenz_kernels.reference.attention_block) on the padded batch; in fp32 / fp64 in
         eager mode with a hand-written backward (_AttentionCore). Also the `dense` dropout (a cheaper CPU mask)
         and RMSNorm / add_rms_norm with a hand-written backward (_RMSNorm), and the summed linear cross-entropy
         with its gradients from the forward (_LinearCESum).
  sdpa   torch.nn.functional.scaled_dot_product_attention for calls without softcap and window (Unsupported
         otherwise); rows that see no key return zeros, as everywhere.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from florenz_kernels.reference import attention_block, segments_from_cu_seqlens, visibility_mask

from .memo import memo
from .registry import Unsupported, register_backend


class _Plan(NamedTuple):
    """How one packed (q, k) layout maps to the padded batch: made once per forward (ops.memo), shared by layers."""

    slot_q: torch.Tensor  # (N, Lmax) packed q row of each padded slot; padding slots point at row T (a zero row)
    slot_k: torch.Tensor  # (N, Smax) the same for k / v (row Tk)
    row_q: torch.Tensor  # (T,) slot (flattened n * Lmax + i) of each packed q row: the inverse of slot_q
    row_k: torch.Tensor  # (Tk,)
    visible: torch.Tensor  # (N, 1, Lmax, Smax) bool: real keys, under the causal / window rule
    sees_nothing: torch.Tensor  # (N, 1, Lmax, 1) bool: query slots that see no key (zeros out, never NaN)
    invisible: torch.Tensor  # ~visible


def _slots(cu: torch.Tensor, width: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, width) packed row of each padded slot (padding: row `total`) and (total,) slot of each packed row.
    `total` comes from the tensor's shape (= cu[-1]): no read of cu."""
    lengths = (cu[1:] - cu[:-1]).long()
    slots = torch.arange(width, device=cu.device)
    slot_rows = torch.where(slots[None] < lengths[:, None], cu[:-1, None].long() + slots[None], total)
    seg, pos = segments_from_cu_seqlens(cu, total)  # packed row t sits in slot (seg, pos): static index math
    return slot_rows, seg * width + pos


def _plan(cu_q, cu_k, Lmax: int, Smax: int, T: int, Tk: int, causal: bool, window) -> _Plan:
    slot_q, row_q = _slots(cu_q, Lmax, T)
    slot_k, row_k = _slots(cu_k, Smax, Tk)
    lq, lk = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    pos_q = torch.arange(Lmax, device=cu_q.device)[None, :, None]
    pos_k = torch.arange(Smax, device=cu_q.device)[None, None, :]
    visible = pos_k < lk[:, None, None]  # (N, L, S): real keys ...
    if causal:  # ... bottom-right aligned per segment: query i sits at key position i + S_n - L_n
        p = pos_q + (lk - lq)[:, None, None]
        visible = visible & (pos_k <= p)
        if window:
            visible = visible & (p - pos_k < window)
    visible = visible[:, None]
    invisible = ~visible
    return _Plan(slot_q, slot_k, row_q, row_k, visible, invisible.all(-1, keepdim=True), invisible)


class _ToPadded(torch.autograd.Function):
    """(T, H, D) packed -> (N, H, width, D) padded (zeros in the padding). Every packed row fills exactly one slot,
    so the backward is the inverse gather, not a scatter-add (index_put with accumulate was ~7 ms of a `small`
    CPU step)."""

    @staticmethod
    def forward(ctx, x_THD, slot_rows, row_slots):
        ctx.save_for_backward(row_slots)
        ext = torch.cat([x_THD, x_THD.new_zeros(1, *x_THD.shape[1:])])
        return ext[slot_rows].transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_NHWD):
        (row_slots,) = ctx.saved_tensors
        return grad_NHWD.transpose(1, 2).flatten(0, 1).index_select(0, row_slots), None, None


class _FromPadded(torch.autograd.Function):
    """(N, H, width, D) padded -> (T, H, D) packed: _ToPadded's transpose (its backward is _ToPadded's forward)."""

    @staticmethod
    def forward(ctx, out_NHWD, slot_rows, row_slots):
        ctx.save_for_backward(slot_rows)
        return out_NHWD.transpose(1, 2).flatten(0, 1).index_select(0, row_slots)

    @staticmethod
    def backward(ctx, grad_THD):
        (slot_rows,) = ctx.saved_tensors
        ext = torch.cat([grad_THD, grad_THD.new_zeros(1, *grad_THD.shape[1:])])
        return ext[slot_rows].transpose(1, 2), None, None


def _packed_as_padded(fn, q, k, v, *, causal, window, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      **kw):
    """Run fn(q, k, v, plan) on the packed batch gathered into padded form; scatter the rows back.

    The padded widths are the caller's max_seqlen_q / max_seqlen_k (Python ints: the model passes the loader's);
    only a caller without them has the lengths read back here (a device sync). The plan (indices and masks) is
    built once per forward and layout (ops.memo)."""
    def longest(cu):  # only for a caller without the host bounds: a device->host read
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    Lmax = int(max_seqlen_q) if max_seqlen_q else longest(cu_seqlens_q)
    Smax = max(int(max_seqlen_k) if max_seqlen_k else longest(cu_seqlens_k), 1)
    T, Tk = q.shape[0], k.shape[0]
    if T == 0 or Lmax == 0:
        return torch.zeros_like(q)
    key = ("dense", id(cu_seqlens_q), id(cu_seqlens_k), Lmax, Smax, T, Tk, bool(causal), int(window or 0),
           q.device)
    plan = memo(key, (cu_seqlens_q, cu_seqlens_k),
                lambda: _plan(cu_seqlens_q, cu_seqlens_k, Lmax, Smax, T, Tk, causal, window))
    out_N = fn(_ToPadded.apply(q, plan.slot_q, plan.row_q), _ToPadded.apply(k, plan.slot_k, plan.row_k),
               _ToPadded.apply(v, plan.slot_k, plan.row_k), plan, **kw)
    return _FromPadded.apply(out_N, plan.slot_q, plan.row_q)


def _keep_scale(shape, p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The dense dropout's mask, kept elements already scaled: one 64-bit draw gives two 32-bit words, and an
    element is dropped iff its word falls in the lowest round(p * 2**32) of the 2**32 values, so
    P(drop) = round(p * 2**32) / 2**32 (within 1.2e-10 of p) and the kept elements are scaled by the exact
    1 / (1 - P(drop))."""
    n, drop = math.prod(shape), round(p * 2**32)
    words = torch.randint(-2**63, 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=device)
    keep = words.view(torch.int32)[:n].view(shape) >= drop - 2**31
    return keep.to(dtype).mul_(2**32 / (2**32 - drop))


def _dropout_dense(x: torch.Tensor, p: float) -> torch.Tensor:
    """ops.dropout on the CPU with a cheaper mask than F.dropout's bernoulli_ (_keep_scale). `small` (2 threads):
    the mask of (8, 4, 92, 92) in 0.9 ms against bernoulli_'s 3.2 ms.
    Unsupported elsewhere (CUDA: torch's fused dropout; torch.compile: its own RNG)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not x.is_floating_point() or not 0 < p < 1:
        raise Unsupported("the dense dropout draws CPU masks in eager mode, 0 < p < 1")
    return x * _keep_scale(x.shape, p, x.dtype, x.device)


def _cheap_dropout(q: torch.Tensor, p: float) -> bool:
    """The dense dropout's mask for this call's attention probabilities (CPU, eager), else F.dropout's."""
    return q.device.type == "cpu" and not torch.compiler.is_compiling() and 0 < p < 1


def scaled_tanh_(x: torch.Tensor, inner: float, outer: float = 1.0) -> torch.Tensor:
    """outer * tanh(inner * x) in place, as outer * (2 * sigmoid(2 * inner * x) - 1): the same function in other
    roundings (absolute error ~2e-7 * outer in fp32, against tanh's ~5e-8; ~1e-16 in fp64), and on the CPU ~4x
    faster than torch.tanh_ (fp32, 1 thread: 1.4 ms against 5.5 ms for 2.1M elements). For fp32 / fp64: in bf16
    the coarser rounding picked other beams in generation."""
    return x.mul_(2.0 * inner).sigmoid_().mul_(2.0 * outer).sub_(outer)


class _AttentionCore(torch.autograd.Function):
    """attention_block's math on one padded block with a hand-written backward, for fp32 / fp64 in eager mode:
    fewer and in-place elementwise ops than autograd's, and GQA without repeating K / V (the G query heads of a KV
    head are one (G * L)-row block). q (N, H, L, D), k / v (N, Hk, S, D); `invisible` (N, 1, L, S) bool (True:
    masked) and `sees_nothing` (N, 1, L, 1) or None; dropout (the dense mask) when p > 0.

    Backward, with z = softcap * tanh(scale * s / softcap) (z = scale * s without softcap), P = softmax(z),
    Pd = P * keep: dV = Pd^T dO, dP = (dO V^T) * keep, dZ = P * (dP - rowsum(dP * P)),
    dS = scale * dZ * (1 - tanh^2), dQ = dS K, dK = dS^T Q. Masked keys and rows that see nothing have P = 0, so
    dZ = 0 there."""

    @staticmethod
    def forward(ctx, q_NHLD, k_NKSD, v_NKSD, scale, softcap, invisible, sees_nothing, dropout_p):
        N, H, L, D = q_NHLD.shape
        Hk, S = k_NKSD.shape[1], k_NKSD.shape[2]
        G = H // Hk
        q = q_NHLD.reshape(N, Hk, G * L, D)
        k, v = k_NKSD.contiguous(), v_NKSD.contiguous()
        s = torch.matmul(q, k.transpose(-1, -2))  # (N, Hk, G * L, S)
        t = scaled_tanh_(s, scale / softcap) if softcap else None
        if invisible is not None:  # the mask as an additive bias, one pass with the softcap's (or scale's) multiply
            bias = torch.zeros(invisible.shape, dtype=s.dtype, device=s.device).masked_fill_(invisible, float("-inf"))
            z = torch.add(bias[:, :, None], (s if t is None else t).view(N, Hk, G, L, S),
                          alpha=scale if t is None else softcap).view(s.shape)
        else:
            z = t * softcap if softcap else s.mul_(scale)
        probs = torch.softmax(z, dim=-1)
        del z
        if sees_nothing is not None:  # softmax gave NaN there; define them as zeros
            probs.view(N, Hk, G, L, S).masked_fill_(sees_nothing[:, :, None], 0.0)
        keep = _keep_scale(probs.shape, dropout_p, probs.dtype, probs.device) if dropout_p else None
        out = torch.matmul(probs if keep is None else probs * keep, v)
        ctx.save_for_backward(q, k, v, probs, t, keep)
        ctx.shape, ctx.scale, ctx.softcap = (N, H, L, D), scale, softcap
        return out.view(N, H, L, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_NHLD):
        q, k, v, probs, t, keep = ctx.saved_tensors
        N, H, L, D = ctx.shape
        Hk = k.shape[1]
        g = grad_NHLD.reshape(N, Hk, -1, grad_NHLD.shape[-1])
        dv = torch.matmul((probs if keep is None else probs * keep).transpose(-1, -2), g)
        dp = torch.matmul(g, v.transpose(-1, -2))
        if keep is not None:
            dp.mul_(keep)
        dz = dp.sub_((dp * probs).sum(-1, keepdim=True)).mul_(probs)
        if ctx.softcap:
            dz.mul_(1.0 - t * t)
        dq = torch.matmul(dz, k).mul_(ctx.scale)
        dk = torch.matmul(dz.transpose(-1, -2), q).mul_(ctx.scale)
        return dq.view(N, H, L, D), dk, dv, None, None, None, None, None


def _block(q4, k4, v4, *, scale, softcap, visible, dropout_p, sees_nothing=None, invisible=None):
    """One padded block's attention: _AttentionCore for fp32 / fp64 in eager mode (its dropout: the dense mask,
    on the CPU), else the reference's attention_block (its autograd, F.dropout off the CPU)."""
    cheap = _cheap_dropout(q4, dropout_p)
    if (q4.dtype in (torch.float32, torch.float64) and q4.dtype == k4.dtype == v4.dtype
            and not torch.compiler.is_compiling() and (cheap or not dropout_p)):
        if visible is not None:  # as (N or 1, 1, L or 1, S): the heads broadcast
            visible = visible.view((1,) * (4 - visible.dim()) + tuple(visible.shape))
            invisible = ~visible if invisible is None else invisible
            sees_nothing = invisible.all(-1, keepdim=True) if sees_nothing is None else sees_nothing
        return _AttentionCore.apply(q4, k4, v4, scale, softcap, invisible, sees_nothing, dropout_p)
    return attention_block(q4, k4, v4, scale=scale, softcap=softcap, visible_BLS=visible, dropout_p=dropout_p,
                           dropout=_dropout_dense if cheap else None)


def _dense_visible(q, k, causal, window, key_padding_mask):
    visible = visibility_mask(q.shape[-2], k.shape[-2], causal=causal, window=window, device=q.device)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].bool()
        visible = pad if visible is None else (visible[None, None] & pad)
    return visible


def _attention_dense_backend(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q,
                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p):
    if cu_seqlens_q is None:
        return _block(q, k, v, scale=scale, softcap=softcap, dropout_p=dropout_p,
                      visible=_dense_visible(q, k, causal, window, key_padding_mask))
    return _packed_as_padded(
        lambda q4, k4, v4, plan: _block(q4, k4, v4, scale=scale, softcap=softcap, visible=plan.visible,
                                        dropout_p=dropout_p, sees_nothing=plan.sees_nothing,
                                        invisible=plan.invisible),
        q, k, v, causal=causal, window=window, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


def _attention_sdpa(q, k, v, *, scale, softcap, causal, window, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, dropout_p):
    if softcap or window:
        raise Unsupported("SDPA has no softcap and no sliding window")

    def sdpa(q4, k4, v4, visible, sees_nothing=None, invisible=None):
        if _cheap_dropout(q4, dropout_p):
            # SDPA's CPU kernels have no dropout (it falls back to its math path with bernoulli_): the same math
            # with the dense dropout's cheaper mask
            return _block(q4, k4, v4, scale=scale, softcap=0.0, visible=visible, dropout_p=dropout_p,
                          sees_nothing=sees_nothing, invisible=invisible)
        if visible is None:
            return F.scaled_dot_product_attention(q4, k4, v4, dropout_p=dropout_p, scale=scale,
                                                  enable_gqa=q4.shape[1] != k4.shape[1])
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=visible, dropout_p=dropout_p, scale=scale,
                                             enable_gqa=q4.shape[1] != k4.shape[1])
        sees_nothing = ~visible.any(-1, keepdim=True) if sees_nothing is None else sees_nothing
        return out.masked_fill(sees_nothing, 0.0)  # rows that see nothing: zeros, not NaN

    if cu_seqlens_q is None:
        return sdpa(q, k, v, _dense_visible(q, k, causal, window, key_padding_mask))
    return _packed_as_padded(lambda q4, k4, v4, plan: sdpa(q4, k4, v4, plan.visible, plan.sees_nothing,
                                                           plan.invisible), q, k, v,
                             causal=causal, window=window, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


class _RMSNorm(torch.autograd.Function):
    """Gemma RMSNorm, y = x * r * (1 + w) with r = rsqrt(mean(x^2) + eps), with a hand-written backward (fp32 /
    fp64, x and w of one dtype): dx = r * (gw - xhat * mean(gw * xhat)) with gw = g * (1 + w) and xhat = x * r,
    dw = sum(g * xhat) over the rows; about half the elementwise ops of autograd's."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt((x * x).mean(-1, keepdim=True).add_(eps))
        xhat = x * r
        w1 = weight + 1.0
        ctx.save_for_backward(xhat, r, w1)
        return xhat * w1

    @staticmethod
    def backward(ctx, g):
        xhat, r, w1 = ctx.saved_tensors
        gw = g * w1
        dx = gw.sub_(xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(r)
        dw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def _rms_norm_dense(x, weight, eps):
    if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype or torch.compiler.is_compiling():
        raise Unsupported("the dense RMSNorm runs fp32 / fp64 (x and weight of one dtype) in eager mode")
    return _RMSNorm.apply(x, weight, eps)


def _add_rms_norm_dense(residual, y, weight, eps, *, scale=None, next_weight=None, next_eps=None):
    """add_rms_norm_reference's composition with the dense RMSNorm (the add and the scale through autograd)."""
    if residual.dtype != y.dtype or (scale is not None and scale.dtype != y.dtype):
        raise Unsupported("the dense add_rms_norm takes one dtype")
    n = _rms_norm_dense(y, weight, eps)
    h = residual + (n if scale is None else scale * n)
    return h, (None if next_weight is None else _rms_norm_dense(h, next_weight, eps if next_eps is None
                                                                else next_eps))


class _LinearCESum(torch.autograd.Function):
    """(sum, per-token losses) of the cross-entropy of softcap(h @ w^T): the chunked algorithm of
    florenz_kernels.linear_cross_entropy with its torch per-row ops (the softcap through scaled_tanh_), the
    gradients computed in the forward (3 logits-sized matmuls) and scaled in the backward; the per-token losses
    carry no gradient."""

    @staticmethod
    def forward(ctx, h_TD, w_VD, labels_T, softcap, ignore_index, z_loss):
        # imported here: a kernel module reads TRITON_INTERPRET when first imported (florenz_kernels' docstring)
        import florenz_kernels.linear_cross_entropy as _lce

        chunk = _lce.default_chunk_size(h_TD.shape[0], w_VD.shape[0], h_TD.dtype, h_TD.device)
        loss_T, dh, dw = _lce._chunked(h_TD, w_VD, labels_T, None, softcap, ignore_index, z_loss, chunk,
                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                       rows=functools.partial(_lce._rows_torch, tanh_=scaled_tanh_))
        ctx.save_for_backward(dh, dw)
        ctx.mark_non_differentiable(loss_T)
        return loss_T.sum(), loss_T

    @staticmethod
    def backward(ctx, g_sum, _g_tokens):
        dh, dw = ctx.saved_tensors
        return (None if dh is None else dh * g_sum.to(dh.dtype), None if dw is None else dw * g_sum.to(dw.dtype),
                None, None, None, None)


def _linear_cross_entropy_dense(hidden, weight, labels, *, softcap, ignore_index, z_loss, reduction,
                                check_labels=True):
    """ops.linear_cross_entropy for the reductions that backpropagate a sum ("sum", "mean", "sum+none"), fp32 /
    fp64, in eager mode; "none" (its backward recomputes per-token weighted chunks) passes on to the reference.
    The labels are the caller's to check (the loader does, on the host)."""
    if (reduction == "none" or hidden.dtype not in (torch.float32, torch.float64) or weight.dtype != hidden.dtype
            or torch.compiler.is_compiling()):
        raise Unsupported("the dense linear cross-entropy backpropagates a sum, fp32 / fp64, in eager mode")
    lead = labels.shape
    total, tok = _LinearCESum.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), softcap,
                                    ignore_index, z_loss)
    tok = tok.view(lead)
    if reduction == "sum+none":
        return total, tok
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum()


register_backend("dense", _attention_dense_backend)
register_backend("sdpa", _attention_sdpa)
register_backend("dense", _dropout_dense, op="dropout")
register_backend("dense", _rms_norm_dense, op="rms_norm")
register_backend("dense", _add_rms_norm_dense, op="add_rms_norm")
register_backend("dense", _linear_cross_entropy_dense, op="linear_cross_entropy")
