"""The image-token projection of SPEC §2, fused: DaViT features -> the encoder's image tokens.

    image_tokens(x_BNC, pos_NC, weight_dC, ln_weight_d, ln_bias_d, eps=1e-5) -> (B, 1 + N, d)

Shape legend: B images, N = H*W feature-map tokens, C DaViT channels, d encoder width.

What it computes (florenz_fast.vision.ImageTokenProjector with the `torch` backend is the definition):
    y = x + pos                       pos: the 2D position embedding plus the temporal embedding of frame 0
    y = [mean_n(y) ; y]               the mean token first
    out = LayerNorm(y @ W^T)          no projection bias

How: the projection is linear, so y @ W^T = x @ W^T + pos @ W^T and the mean token's projection is the mean of
the projected rows. So
    P    = x @ W^T                    one GEMM straight from the DaViT output (cuBLAS), (B, N, d)
    posb = pos @ W^T                  one small GEMM, (N, d), shared by the whole batch
    out  = image_token_norm(P, posb)  one Triton pass: add posb, LayerNorm every row, and the column sums
                                      that give the mean token; a second tiny kernel normalises the mean token
instead of the unfused sequence's separate add, mean, concatenation copy, projection and LayerNorm passes over
(B, N, C) and (B, 1+N, d) tensors. In exact arithmetic the two are equal; in floating point they differ by the
rounding of a different summation order (tests hold the fused path to the reference's own error).

Backward (for completeness: the vision tower and this projection are frozen in Florenz's training):
`image_token_norm` has a Triton backward (LayerNorm backward per row, the mean token's gradient spread over its
N rows); autograd of the two GEMMs gives dx, dpos and dW.

`image_token_norm` is the torch.library op `florenz::image_token_norm` (fake implementation for
torch.compile, autograd via register_autograd). Output dtype: that of P (the GEMM's, i.e. the autocast dtype
under autocast; the unfused reference's LayerNorm would return fp32 there). LayerNorm math in fp32.
CPU: runs under TRITON_INTERPRET=1 (set before importing this module), as the attention kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .reference import image_tokens_reference

__all__ = ["image_tokens", "image_token_norm", "image_tokens_reference"]

_ROW_TILE_ELEMS = 4096  # rows x padded width held at once by one program (fp32 registers)
_CHUNK_ROWS = 32  # rows per program in the row kernels: the column partial sums stay small (B x N/32 x d)


@triton.jit
def _rows_plus_positions(P, POSB, b, rows, offs_d, m, D, stride_pb, stride_pn):
    """(TILE, BLOCK_D) fp32 pre-norm rows P[b, rows] + posb[rows] (zeros where masked)."""
    p = tl.load(P + b * stride_pb + rows[:, None] * stride_pn + offs_d[None, :], mask=m, other=0.0)
    return p.to(tl.float32) + tl.load(POSB + rows[:, None] * D + offs_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _rows_fwd_kernel(P, POSB, LNW, LNB, OUT, PART, MEAN, RSTD, N, D, eps,
                     stride_pb, stride_pn, stride_ob, stride_on, n_chunks,
                     TILE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [chunk * CHUNK, +CHUNK) of image b: out[b, 1 + n] = LN(P[b, n] + posb[n]); column sums -> PART."""
    chunk, b = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    w = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.load(LNB + offs_d, mask=dmask, other=0.0).to(tl.float32)
    colsum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, CHUNK, TILE):
        rows = chunk * CHUNK + r0 + tl.arange(0, TILE)
        m = (rows < N)[:, None] & dmask[None, :]
        p = _rows_plus_positions(P, POSB, b, rows, offs_d, m, D, stride_pb, stride_pn)
        colsum += tl.sum(p, axis=0)
        mu = tl.sum(p, axis=1) / D
        xc = tl.where(m, p - mu[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        y = xc * rstd[:, None] * w[None, :] + bias[None, :]
        tl.store(OUT + b * stride_ob + (rows[:, None] + 1) * stride_on + offs_d[None, :],
                 y.to(OUT.dtype.element_ty), mask=m)
        rmask = rows < N
        tl.store(MEAN + b * (N + 1) + rows + 1, mu, mask=rmask)
        tl.store(RSTD + b * (N + 1) + rows + 1, rstd, mask=rmask)
    tl.store(PART + (b * n_chunks + chunk) * D + offs_d, colsum, mask=dmask)


@triton.jit
def _mean_fwd_kernel(PART, LNW, LNB, OUT, MROW, MEAN, RSTD, N, D, eps, stride_ob, n_chunks,
                     BLOCK_D: tl.constexpr):
    """The mean token of image b: out[b, 0] = LN(sum of its column partial sums / N); keeps the row in MROW."""
    b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(PART + (b * n_chunks + c) * D + offs_d, mask=dmask, other=0.0)
    row = acc / N
    tl.store(MROW + b * D + offs_d, row, mask=dmask)
    mu = tl.sum(row, axis=0) / D
    xc = tl.where(dmask, row - mu, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.load(LNB + offs_d, mask=dmask, other=0.0).to(tl.float32)
    tl.store(OUT + b * stride_ob + offs_d, (xc * rstd * w + bias).to(OUT.dtype.element_ty), mask=dmask)
    tl.store(MEAN + b * (N + 1), mu)
    tl.store(RSTD + b * (N + 1), rstd)


@triton.jit
def _ln_grad(xhat, dy, w, m, D):
    """LayerNorm backward of (TILE, BLOCK_D) rows, up to the factor rstd: g - mean(g) - xhat * mean(g * xhat)."""
    g = tl.where(m, dy * w, 0.0)
    c1 = tl.sum(g * xhat, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    return g - c2[:, None] - xhat * c1[:, None]


@triton.jit
def _mean_bwd_kernel(DOUT, MROW, LNW, MEAN, RSTD, DMEAN, DWB, N, D, stride_db, BLOCK_D: tl.constexpr):
    """Mean token of image b: its pre-norm gradient / N (spread over the N rows later) -> DMEAN; dw, db -> DWB."""
    b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mu = tl.load(MEAN + b * (N + 1))
    rstd = tl.load(RSTD + b * (N + 1))
    xhat = tl.where(dmask, (tl.load(MROW + b * D + offs_d, mask=dmask, other=0.0) - mu) * rstd, 0.0)
    dy = tl.load(DOUT + b * stride_db + offs_d, mask=dmask, other=0.0).to(tl.float32)
    w = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
    g = tl.where(dmask, dy * w, 0.0)
    dp = (g - tl.sum(g, axis=0) / D - xhat * (tl.sum(g * xhat, axis=0) / D)) * rstd
    tl.store(DMEAN + b * D + offs_d, dp / N, mask=dmask)
    tl.store(DWB + (2 * b) * D + offs_d, dy * xhat, mask=dmask)
    tl.store(DWB + (2 * b + 1) * D + offs_d, dy, mask=dmask)


@triton.jit
def _rows_bwd_kernel(DOUT, P, POSB, LNW, MEAN, RSTD, DMEAN, DP, DWB_PART, N, D,
                     stride_db, stride_dn, stride_pb, stride_pn, n_chunks,
                     TILE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """dP[b, n] = LN-backward of row 1 + n, plus the mean token's share; dw, db partial sums -> DWB_PART."""
    chunk, b = tl.program_id(0), tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    w = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dmean = tl.load(DMEAN + b * D + offs_d, mask=dmask, other=0.0)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, CHUNK, TILE):
        rows = chunk * CHUNK + r0 + tl.arange(0, TILE)
        rmask = rows < N
        m = rmask[:, None] & dmask[None, :]
        p = _rows_plus_positions(P, POSB, b, rows, offs_d, m, D, stride_pb, stride_pn)
        mu = tl.load(MEAN + b * (N + 1) + rows + 1, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + b * (N + 1) + rows + 1, mask=rmask, other=0.0)
        xhat = tl.where(m, (p - mu[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DOUT + b * stride_db + (rows[:, None] + 1) * stride_dn + offs_d[None, :], mask=m,
                     other=0.0).to(tl.float32)
        dp = _ln_grad(xhat, dy, w[None, :], m, D) * rstd[:, None] + dmean[None, :]
        tl.store(DP + b * N * D + rows[:, None] * D + offs_d[None, :], dp.to(DP.dtype.element_ty), mask=m)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    base = (b * n_chunks + chunk) * 2 * D
    tl.store(DWB_PART + base + offs_d, dw, mask=dmask)
    tl.store(DWB_PART + base + D + offs_d, db, mask=dmask)


# ---- launchers -------------------------------------------------------------------------------------------


def _geometry(D: int):
    block_d = triton.next_power_of_2(D)
    tile = max(1, min(_CHUNK_ROWS, _ROW_TILE_ELEMS // block_d))
    return block_d, tile, 4 if block_d <= 1024 else 8


def _check(P, posb, ln_weight, ln_bias):
    if P.dim() != 3 or posb.dim() != 2 or tuple(posb.shape) != tuple(P.shape[1:]):
        raise ValueError(f"image_token_norm: P must be (B, N, d) and posb (N, d), got {tuple(P.shape)} and "
                         f"{tuple(posb.shape)}")
    d = P.shape[-1]
    if tuple(ln_weight.shape) != (d,) or tuple(ln_bias.shape) != (d,):
        raise ValueError(f"image_token_norm: LayerNorm weight/bias must be ({d},), got {tuple(ln_weight.shape)} "
                         f"and {tuple(ln_bias.shape)}")
    if P.shape[1] == 0:
        raise ValueError("image_token_norm: no feature-map tokens (N = 0)")
    if P.stride(-1) != 1:
        raise ValueError(f"image_token_norm: P's last dim must be contiguous, got strides {P.stride()}")


@torch.library.custom_op("florenz::image_token_norm", mutates_args=())
def image_token_norm_fwd(P: torch.Tensor, posb: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (B, 1+N, d) in P's dtype, mean and rstd (B, 1+N) fp32, the mean token's pre-norm row (B, d))."""
    B, N, D = P.shape
    posb, ln_weight, ln_bias = posb.contiguous(), ln_weight.contiguous(), ln_bias.contiguous()
    block_d, tile, warps = _geometry(D)
    n_chunks = triton.cdiv(N, _CHUNK_ROWS)
    out = torch.empty(B, N + 1, D, dtype=P.dtype, device=P.device)
    part = torch.empty(B, n_chunks, D, dtype=torch.float32, device=P.device)
    mean = torch.empty(B, N + 1, dtype=torch.float32, device=P.device)
    rstd = torch.empty_like(mean)
    mrow = torch.empty(B, D, dtype=torch.float32, device=P.device)
    _rows_fwd_kernel[(n_chunks, B)](P, posb, ln_weight, ln_bias, out, part, mean, rstd, N, D, eps,
                                    P.stride(0), P.stride(1), out.stride(0), out.stride(1), n_chunks,
                                    TILE=tile, CHUNK=_CHUNK_ROWS, BLOCK_D=block_d, num_warps=warps)
    _mean_fwd_kernel[(B,)](part, ln_weight, ln_bias, out, mrow, mean, rstd, N, D, eps, out.stride(0), n_chunks,
                           BLOCK_D=block_d, num_warps=warps)
    return out, mean, rstd, mrow


@image_token_norm_fwd.register_fake
def _(P, posb, ln_weight, ln_bias, eps):
    B, N, D = P.shape
    f32 = dict(dtype=torch.float32, device=P.device)
    return (P.new_empty(B, N + 1, D), torch.empty(B, N + 1, **f32), torch.empty(B, N + 1, **f32),
            torch.empty(B, D, **f32))


@torch.library.custom_op("florenz::image_token_norm_bwd", mutates_args=())
def image_token_norm_bwd(dout: torch.Tensor, P: torch.Tensor, posb: torch.Tensor, ln_weight: torch.Tensor,
                         mean: torch.Tensor, rstd: torch.Tensor, mrow: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dP (B, N, d) in P's dtype, dposb (N, d) in posb's dtype, dweight, dbias (d,))."""
    B, N, D = P.shape
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    posb, ln_weight = posb.contiguous(), ln_weight.contiguous()
    block_d, tile, warps = _geometry(D)
    n_chunks = triton.cdiv(N, _CHUNK_ROWS)
    dmean = torch.empty(B, D, dtype=torch.float32, device=P.device)
    dwb_mean = torch.empty(B, 2, D, dtype=torch.float32, device=P.device)
    _mean_bwd_kernel[(B,)](dout, mrow, ln_weight, mean, rstd, dmean, dwb_mean, N, D, dout.stride(0),
                           BLOCK_D=block_d, num_warps=warps)
    dP = torch.empty(B, N, D, dtype=P.dtype, device=P.device)
    dwb_part = torch.empty(B, n_chunks, 2, D, dtype=torch.float32, device=P.device)
    _rows_bwd_kernel[(n_chunks, B)](dout, P, posb, ln_weight, mean, rstd, dmean, dP, dwb_part, N, D,
                                    dout.stride(0), dout.stride(1), P.stride(0), P.stride(1), n_chunks,
                                    TILE=tile, CHUNK=_CHUNK_ROWS, BLOCK_D=block_d, num_warps=warps)
    dw = dwb_part[:, :, 0].sum((0, 1)) + dwb_mean[:, 0].sum(0)
    db = dwb_part[:, :, 1].sum((0, 1)) + dwb_mean[:, 1].sum(0)
    dposb = dP.sum(0, dtype=torch.float32).to(posb.dtype)
    return dP, dposb, dw.to(ln_weight.dtype), db.to(ln_weight.dtype)


@image_token_norm_bwd.register_fake
def _(dout, P, posb, ln_weight, mean, rstd, mrow):
    return P.new_empty(P.shape), posb.new_empty(posb.shape), ln_weight.new_empty(ln_weight.shape), \
        ln_weight.new_empty(ln_weight.shape)


def _setup_context(ctx, inputs, output):
    P, posb, ln_weight, ln_bias, eps = inputs
    _, mean, rstd, mrow = output
    ctx.save_for_backward(P, posb, ln_weight, mean, rstd, mrow)
    ctx.bias_dtype = ln_bias.dtype


def _backward(ctx, dout, _dmean, _drstd, _dmrow):
    P, posb, ln_weight, mean, rstd, mrow = ctx.saved_tensors
    dP, dposb, dw, db = image_token_norm_bwd(dout, P, posb, ln_weight, mean, rstd, mrow)
    return dP, dposb, dw, db.to(ctx.bias_dtype), None


image_token_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def image_token_norm(P: torch.Tensor, posb: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                     eps: float = 1e-5) -> torch.Tensor:
    """The normalisation half of the image-token projection, one Triton pass:
    LayerNorm([mean_n(P + posb) ; P + posb]) over the last dim (the mean token first).

    Args:
      P: (B, N, d) fp16 / bf16 / fp32 projected feature-map tokens (x @ W^T), last dim contiguous; N >= 1.
      posb: (N, d) projected position embeddings (pos @ W^T), shared by the batch (read in fp32; its gradient
        comes back in posb's dtype).
      ln_weight, ln_bias: (d,) LayerNorm affine parameters (any float dtype, read in fp32).
      eps: LayerNorm epsilon.

    Returns:
      (B, 1 + N, d) in P's dtype (LayerNorm math in fp32); row 0 of each image is the mean token. Differentiable
      in P, posb, ln_weight and ln_bias (Triton backward).
    """
    _check(P, posb, ln_weight, ln_bias)
    return image_token_norm_fwd(P, posb, ln_weight, ln_bias, float(eps))[0]


def image_tokens(x_BNC: torch.Tensor, pos_NC: torch.Tensor, weight_dC: torch.Tensor, ln_weight: torch.Tensor,
                 ln_bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The fused image-token projection: DaViT features -> the encoder's image tokens,
    LayerNorm([mean_n(x + pos) ; x + pos] @ W^T), computed as two GEMMs (x @ W^T, pos @ W^T) and
    image_token_norm (the projection is linear, so the mean token is the mean of the projected rows).

    Args:
      x_BNC: (B, N, C) DaViT output tokens (N = H*W of the feature map), fp16 / bf16 / fp32.
      pos_NC: (N, C) position embedding (2D position plus frame-0 temporal embedding).
      weight_dC: (d, C) projection weight (no bias); x, pos and weight share a dtype, as F.linear needs (or
        run under autocast).
      ln_weight, ln_bias: (d,) LayerNorm affine parameters.
      eps: LayerNorm epsilon.

    Returns:
      (B, 1 + N, d) in the GEMM's dtype (x's, or the autocast dtype), the mean token first. Equal to
      image_tokens_reference up to summation order; differentiable in every tensor argument.
    """
    if x_BNC.dim() != 3 or tuple(pos_NC.shape) != tuple(x_BNC.shape[1:]) or weight_dC.shape[1] != x_BNC.shape[2]:
        raise ValueError(f"image_tokens: x must be (B, N, C), pos (N, C) and weight (d, C); got "
                         f"{tuple(x_BNC.shape)}, {tuple(pos_NC.shape)}, {tuple(weight_dC.shape)}")
    return image_token_norm(F.linear(x_BNC, weight_dC), F.linear(pos_NC, weight_dC), ln_weight, ln_bias, eps)



# ---- static checks (no GPU): every kernel compiles for sm_80 / sm_90 without spills ------------------------

_KERNELS = {"rows_fwd": "_rows_fwd_kernel", "mean_fwd": "_mean_fwd_kernel", "mean_bwd": "_mean_bwd_kernel",
            "rows_bwd": "_rows_bwd_kernel"}
_IO_PTRS = {"P", "POSB", "OUT", "DOUT", "DP"}  # in P's dtype
_F32_PTRS = {"LNW", "LNB", "PART", "MEAN", "RSTD", "MROW", "DMEAN", "DWB", "DWB_PART"}


def static_resource_report(kind: str, width: int, dtype: torch.dtype, capability: tuple[int, int]) -> dict:
    """Compile one kernel for encoder width `width` and `capability` here (florenz_kernels._static)."""
    from ._static import compile_report

    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    block_d, tile, warps = _geometry(width)
    const = dict(BLOCK_D=block_d)
    if kind.startswith("rows"):
        const.update(TILE=tile, CHUNK=_CHUNK_ROWS)
    fn = globals()[_KERNELS[kind]]

    def arg_type(name):
        if name in _IO_PTRS or name in _F32_PTRS:
            return "*" + ty if name in _IO_PTRS else "*fp32"
        return "fp32" if name == "eps" else "i32"

    report = compile_report(fn, const, arg_type, lambda name: name in _IO_PTRS or name in _F32_PTRS, capability,
                            num_warps=warps, num_stages=1)
    report.update(kind=kind, width=width, dtype=ty)
    return report
