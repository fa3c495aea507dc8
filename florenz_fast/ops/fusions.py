"""The fused ops' APIs (rms_norm, add_rms_norm, geglu, rope, linear_cross_entropy, image_tokens, dropout) and their
`torch` backend: florenz_kernels.reference, the definitions (what the model computed before the fusions). Math in
promote_types(input dtype, float32): fp32 for 16-bit and fp32 inputs, float64 for float64 ones."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from florenz_kernels import reference as ref

from .registry import dispatch, register_backend


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str | None = None) -> torch.Tensor:
    """Gemma RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32 (float64 for float64), cast
    back to x's dtype."""
    return dispatch("rms_norm", backend, x, weight, eps)


def add_rms_norm(residual: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 scale: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                 next_eps: float | None = None, backend: str | None = None):
    """h = residual + scale * rms_norm(y, weight) (scale: a 1-element tensor or None), and the next pre-norm
    rms_norm(h, next_weight) when next_weight is given (else None). Returns (h, next)."""
    return dispatch("add_rms_norm", backend, residual, y, weight, eps, scale=scale, next_weight=next_weight,
                    next_eps=eps if next_eps is None else next_eps)


def geglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up."""
    return dispatch("geglu", backend, gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None):
    """Rotate-half RoPE of q (B, H, L, D) and k (B, Hk, L, D) with cos/sin (B or 1, 1, L, D) (the two halves of the
    last dim equal, as `Rotary.cos_sin` builds them). Returns (q, k); the triton backend rotates in place."""
    return dispatch("rope", backend, q, k, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float = 30.0,
                         ignore_index: int = -100, z_loss: float = 0.0, reduction: str = "mean",
                         check_labels: bool = True, backend: str | None = None) -> torch.Tensor:
    """Cross-entropy of softcap(hidden @ weight^T) against labels (ignore_index skipped), per token in fp32 (float64
    for float64).

    hidden (..., D), weight (V, D), labels (...). reduction "none" -> (...) per-token losses (0 where ignored),
    "sum", "mean" over the non-ignored tokens, or "sum+none" -> (sum, per-token losses without gradient): the
    fused kernel then keeps the gradients its forward computed (3 logits matmuls, not 4). z_loss > 0 adds
    z_loss * logsumexp^2 per token.
    check_labels=False: the labels were checked on the host (packing.check_limits), so the fused kernel skips its
    range check, a device->host read (DESIGN.md 13); the torch reference never reads."""
    return dispatch("linear_cross_entropy", backend, hidden, weight, labels, softcap=softcap,
                    ignore_index=ignore_index, z_loss=z_loss, reduction=reduction, check_labels=check_labels)


def image_tokens(x_BNC: torch.Tensor, pos_NC: torch.Tensor, weight_dC: torch.Tensor, ln_weight: torch.Tensor,
                 ln_bias: torch.Tensor, eps: float = 1e-5, *, backend: str | None = None) -> torch.Tensor:
    """The image-token projection (SPEC §2): DaViT tokens x (B, N, C) + positions pos (N, C), the mean token
    prepended, projected by weight (d, C) (no bias), LayerNorm(ln_weight, ln_bias, eps) -> (B, 1 + N, d)."""
    return dispatch("image_tokens", backend, x_BNC, pos_NC, weight_dC, ln_weight, ln_bias, eps)


def dropout(x: torch.Tensor, p: float, training: bool = True, *, backend: str | None = None) -> torch.Tensor:
    """Dropout: each element zeroed with probability p, the rest scaled by 1 / (1 - p); x itself when not training
    or p == 0. `torch` is F.dropout; `dense` draws its CPU mask from 32-bit random words (ops.dense)."""
    if not training or not p:
        return x
    return dispatch("dropout", backend, x, p)


for _op, _fn in (("dropout", lambda x, p: F.dropout(x, p, True)),
                 ("rms_norm", ref.rms_norm_reference), ("add_rms_norm", ref.add_rms_norm_reference),
                 ("geglu", ref.geglu_reference), ("rope", ref.rope_full_reference),
                 ("linear_cross_entropy", ref.linear_cross_entropy_reference),
                 ("image_tokens", ref.image_tokens_reference)):
    register_backend("torch", _fn, op=_op)
