"""Softcapped (Gemma-2) attention in Triton: forward and backward, causal + sliding window + GQA + varlen.

    softcap_attention(q, k, v, *, softcap=0.0, scale=None, causal=True, window=None,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                      key_padding_mask=None) -> (out, lse)

Shape legend: B batch, H query heads, Hk key/value heads (H % Hk == 0), L queries, S keys, D head dim
(1..256, the same for q, k and v), T / Tk packed query / key tokens, N packed segments.

Layouts
  padded: q (B, H, L, D), k and v (B, Hk, S, D) -> out (B, H, L, D), lse (B, H, L).
          `key_padding_mask` (B, S) bool, True = a real key (padded layout only).
  packed: q (T, H, D), k and v (Tk, Hk, D), `cu_seqlens_q` / `cu_seqlens_k` (N+1,) int32 cumulative lengths
          -> out (T, H, D), lse (H, T). Query segment n sees only key segment n (block-diagonal).
          max_seqlen_q / max_seqlen_k size the launch grid; computed from cu_seqlens when None (a host
          sync, and a graph break under torch.compile: pass them when compiling).
  Any strides with a contiguous last dim (e.g. the (B, L, H, D) -> (B, H, L, D) transpose views that
  transformers hands over); `out` has q's strides, dq/dk/dv those of q/k/v.

Head dims: any D in 1..256, internally padded to BLOCK_D = max(16, next power of two of D) (tl.arange needs a
  power of two, tl.dot a K of at least 16). Every load and store of q, k, v, out, dO, dq, dk, dv is masked on
  d < D: padded lanes read 0 (they add 0 to q.k and to dO.v) and are never written, so nothing is read or written
  outside the tensors' D columns and no padded copy is made. The cost is compute, not memory traffic: the tiles
  and every matmul over d are BLOCK_D wide, so 1 - D / BLOCK_D of those lanes are wasted; registers and shared
  memory are sized by BLOCK_D, so a config is chosen by BLOCK_D's class (64 / 128 / 256). Wasted lanes:
      D       8    24    40    72    80    96   112   160   192
      BLOCK  16    32    64   128   128   128   128   256   256
      waste 50%   25%   38%   44%   38%   25%   12%   38%   25%    (64, 128, 256: none; head_dim_padding(D))
  Every matmul is padded (Q.K^T and dO.V^T reduce over BLOCK_D; P.V, dS.K, dS^T.Q and P^T.dO produce BLOCK_D
  columns); the elementwise L x S score work (tanh, exp2, masks) is not, so a matmul-bound D = 72 does at most
  72 / 128 = 56 % useful tensor-core work. D with BLOCK_D = 256 (129..256) also takes the two-pass dK / dV
  backward (see Kernels below).
  D % 16 != 0 (8, 24, 40, 72): the strides are not multiples of 16 elements, the only divisibility Triton proves at
  launch; they are passed in units of their largest power-of-two divisor <= 16 (STRIDE_ALIGN, _units) so a D = 72
  row is still known 8-aligned and keeps its vector loads (without it 7 of 12 bf16 sm_80/sm_90 configs spilled).
  D > 256 or D < 1: ValueError (florenz_fast.ops.attention runs D > 256 on its torch reference).

Semantics (identical to florenz_fast.ops' `torch` backend, which defines them)
  s = scale * q.k (scale defaults to D^-0.5); softcap c > 0: s = c * tanh(s / c), applied before masking;
  softmax in fp32; out = P @ v in the input dtype, accumulated in fp32. GQA: query head h reads kv head
  h // (H // Hk); K/V are never expanded and dK/dV are reduced per kv head inside one program (deterministic,
  no atomics anywhere, so every backward is bitwise reproducible).
  causal: bottom-right aligned: query i of a segment with L queries and S keys sits at p(i) = i + S - L and
          sees keys j <= p(i). window W (needs causal): additionally p(i) - j < W (the query and the W - 1 keys
          before it; transformers' Gemma-2 `kv_idx > q_idx - W`). window None or 0: no window.
  A row that sees no key returns zeros and lse = -inf (gradients through it are zero).
  lse = log(sum_j exp(s_ij)) over the visible keys, natural log, fp32; it is differentiable (d lse / d s = P).

Kernels (flash-attention 2 structure, never materialising L x S)
  _fwd_kernel   grid (query blocks, B*H): online softmax in the exp2 domain; the key range of a query block is
                split into [masked window edge | unmasked interior | masked diagonal/tail] so the interior blocks
                pay no mask arithmetic.
  _bwd_preprocess  delta = rowsum(dO * O) - dlse.
  _bwd_dkdv_kernel grid (key blocks, B*Hk): one flat loop over (query head of its GQA group, query block that
                sees the key block); dK, dV accumulate in fp32 registers. Fused for D <= 128; for D = 256 two
                passes of the same kernel (COMPUTE_DK / COMPUTE_DV), since the two fp32 accumulators spill.
  _bwd_dq_kernel grid (query blocks, B*H): loops over the visible key blocks; dQ in fp32 registers.
  Softcap backward: d(c tanh(x/c))/dx = 1 - tanh^2, with tanh recomputed from the recomputed scores.
  tanh (florenz_kernels._tl_math.tanh): `tanh.approx.f32` (one MUFU op, max rel. error 2^-11, what
  FlashAttention-2's softcap uses) for bf16 inputs on the GPU, whose score rounding (2^-9) dominates it; otherwise
  an exp formula with an odd Taylor series below |x| = 0.125 (fp32-accurate; the Triton interpreter has neither
  libdevice tanh nor inline asm).
  Device helpers shared by the kernels (inlined, no run-time cost): _segment (a segment's length and first
  token), _key_range (the three key ranges of a query block), _visible (the causal / window / padding mask of a
  score tile, either orientation), _scores (scale or softcap of the raw q.k products).

Registered as torch.library ops `florenz::softcap_attention_fwd` / `florenz::softcap_attention_bwd` (fake
implementations for torch.compile, autograd via register_autograd; activation-checkpointing policies can name
`torch.ops.florenz.softcap_attention_fwd.default`).

CPU: set TRITON_INTERPRET=1 *before importing this module* (Triton reads it when the kernels are decorated);
the interpreter runs fp32 and fp16 correctly (its bf16 tl.dot is wrong: Triton trap, see DESIGN.md).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._tl_math import tanh
from .reference import check_attention_inputs, softcap_attention_reference

__all__ = [
    "softcap_attention",
    "softcap_attention_reference",
    "head_dim_padding",
    "INTERPRET",
    "MAX_HEAD_DIM",
]

# Triton decides interpreted vs compiled when a function is decorated (triton 3.6 and 3.8 alike).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FLORENZ_NO_AUTOTUNE=1: use the first config of each list (GPU test runs: one compile per kernel variant).
_NO_AUTOTUNE = os.environ.get("FLORENZ_NO_AUTOTUNE", "0") not in ("", "0")

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256


# ---- device functions -----------------------------------------------------------------------------------


@triton.jit
def _exp(x, NATURAL: tl.constexpr):
    # scores live in log2 units (s_scale / s_cap carry log2(e): one FMA per exp2 on the GPU) for 16-bit inputs;
    # for fp32 they stay natural and are converted after the subtraction: pre-scaling scores of magnitude ~20
    # by log2(e) costs an ulp of 23 (1e-6) per score and put the fp32 backward outside 2x of the fp32 reference
    if NATURAL:
        y = tl.math.exp2(x * _LOG2E)
    else:
        y = tl.math.exp2(x)
    return y


@triton.jit
def _units(a, b, c, A: tl.constexpr):
    """Three strides passed in units of A elements (see _stride_align), back in elements. The product with the
    constexpr A tells the compiler they are multiples of A: Triton itself only proves divisibility by 16 at launch,
    so a D = 72 row (stride 72) would otherwise count as 1-aligned, lose its vector loads and spill (static report:
    sm_90 forward 8-448 B, dK/dV 200 B; none with the 8-element hint)."""
    return a * A, b * A, c * A


@triton.jit
def _segment(CU, b, seqlen, IS_VARLEN: tl.constexpr):
    """(length, first token) of segment b: read from the cumulative lengths CU when packed; padded, every batch
    row has `seqlen` and starts at token 0 (the batch stride does the rest)."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        n = tl.load(CU + b + 1) - start
        tok = start.to(tl.int64)
    else:
        n = seqlen
        tok = 0
    return n, tok


@triton.jit
def _key_range(start_m, L, S, off, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range [lo, hi) of the query block [start_m, start_m + BLOCK_M), and its fully visible interior
    [full_lo, full_hi) (block aligned, lo <= full_lo <= full_hi <= hi); off = S - L (p(i) = i + off).
    Every quantity is clamped to >= 0 before `//`: Triton rounds toward zero, the interpreter toward -inf."""
    p_first = start_m + off
    p_last = tl.minimum(start_m + BLOCK_M, L) - 1 + off
    if IS_CAUSAL:
        hi = tl.minimum(S, p_last + 1)
        full_hi = (tl.maximum(tl.minimum(S, p_first + 1), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full_hi = (S // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.maximum(p_first - window + 1, 0) // BLOCK_N) * BLOCK_N
        full_lo = ((tl.maximum(p_last - window + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
        full_lo = 0
    if HAS_KPM:  # any key may be masked: every block takes the masked path
        full_lo = lo
        full_hi = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(start_n, L, S, off, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_KPM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range [lo, hi) that sees the key block [start_n, start_n + BLOCK_N), and its fully visible interior
    [full_lo, full_hi) (block aligned, lo <= full_lo <= full_hi <= hi; the dK/dV kernels'). Query rows >= L would
    pollute dK/dV, so the interior also ends at a whole block inside L. Clamped before `//` as in _key_range."""
    n_last = tl.minimum(start_n + BLOCK_N, S) - 1
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - off, 0) // BLOCK_M) * BLOCK_M
        full_lo = ((tl.maximum(n_last - off, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_lo = 0
    if HAS_WINDOW:
        hi = tl.minimum(L, tl.maximum(n_last + window - off, 0))
        full_hi = (tl.maximum(tl.minimum(start_n + window - off, L), 0) // BLOCK_M) * BLOCK_M
    else:
        hi = L
        full_hi = (L // BLOCK_M) * BLOCK_M
    if HAS_KPM:
        full_lo = lo
        full_hi = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(in_range, pos_m, offs_n, kp, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_KPM: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """Which scores of a tile are visible: in_range (the tile's bounds check, already in the tile's shape) and
    causal (key j <= p(i)), window (p(i) - j < window) and key padding (kp[j] != 0, the loaded mask values).
    pos_m: the query positions p(i); offs_n: the key indices. The tile is (queries, keys), or (keys, queries)
    with KEYS_FIRST (the transposed scores of the dK/dV kernel)."""
    vis = in_range
    if KEYS_FIRST:
        if IS_CAUSAL:
            vis = vis & (offs_n[:, None] <= pos_m[None, :])
        if HAS_WINDOW:
            vis = vis & ((pos_m[None, :] - offs_n[:, None]) < window)
        if HAS_KPM:
            vis = vis & (kp[:, None] != 0)
    else:
        if IS_CAUSAL:
            vis = vis & (offs_n[None, :] <= pos_m[:, None])
        if HAS_WINDOW:
            vis = vis & ((pos_m[:, None] - offs_n[None, :]) < window)
        if HAS_KPM:
            vis = vis & (kp[None, :] != 0)
    return vis


@triton.jit
def _scores(qk, s_scale, scale_over_cap, s_cap, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
    """Scores from the raw q.k products (log2 or natural units: see _exp and _scalars): s = qk * s_scale, or
    with a softcap s = t * s_cap with t = tanh(qk * scale_over_cap). Returns (s, t); the softcap backward needs t
    (d s / d qk carries 1 - t^2); without a softcap t is s (unused)."""
    if SOFTCAP:
        t = tanh(qk * scale_over_cap, FAST_TANH)
        s = t * s_cap
    else:
        s = qk * s_scale
        t = s
    return s, t


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, lo, hi, pos_m, offs_n0, offs_d,
               S, window, s_scale, scale_over_cap, s_cap,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
               SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kT_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kT = tl.load(kT_ptrs, mask=(offs_n[None, :] < S) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif EVEN_D:
            kT = tl.load(kT_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PREC)
        s, _ = _scores(qk, s_scale, scale_over_cap, s_cap, SOFTCAP, FAST_TANH)
        if MASKED:
            kp = None
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n, mask=offs_n < S, other=0)
            vis = _visible(offs_n[None, :] < S, pos_m, offs_n, kp, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, False)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays 0
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = _exp(s - m_use[:, None], DOT_PREC == "ieee")
        alpha = _exp(m_i - m_use, DOT_PREC == "ieee")
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, KPM,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_kpmb,
                seqlen_q, seqlen_k, H, GROUPS, window, s_scale, scale_over_cap, s_cap, SEQ_BUCKET,
                IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    L, q_tok = _segment(CU_Q, b, seqlen_q, IS_VARLEN)
    S, k_tok = _segment(CU_K, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    stride_qb, stride_qh, stride_qm = _units(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _units(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _units(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_ob, stride_oh, stride_om = _units(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_tok * stride_qm
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_tok * stride_kn
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_tok * stride_vn
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_tok * stride_om
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_tok
    kpm_base = KPM + b64 * stride_kpmb

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    off = S - L  # bottom-right alignment: p(i) = i + off
    pos_m = offs_m + off
    lo, full_lo, full_hi, hi = _key_range(start_m, L, S, off, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, BLOCK_M,
                                          BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, lo, full_lo,
                                   pos_m, offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap,
                                   True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM,
                                   BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, full_lo, full_hi,
                               pos_m, offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap,
                               False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM,
                               BLOCK_N, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, full_hi, hi,
                               pos_m, offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap,
                               True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM,
                               BLOCK_N, DOT_PREC)

    empty = l_i == 0.0  # no visible key: zeros and lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DOT_PREC == "ieee":  # natural units (see _exp)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * _LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, CU_Q, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    stride_lb, stride_lh, seqlen_q, H,
                    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    L, q_tok = _segment(CU_Q, b, seqlen_q, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    stride_ob, stride_oh, stride_om = _units(stride_ob, stride_oh, stride_om, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _units(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + q_tok * stride_om + offs_m[:, None] * stride_om
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + q_tok * stride_dom + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + q_tok + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, stride_qh, stride_qm, stride_doh,
                stride_dom, stride_lh, lo, hi, GROUPS, offs_n, offs_m0, offs_d, L, off, window, scale_over_cap,
                s_cap, s_scale,
                MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr):
    kp = None
    if MASKED and HAS_KPM:
        kp = tl.load(kpm_base + offs_n, mask=offs_n < L + off, other=0)
    # One flat loop over (query head of the GQA group, query block): as an outer `for g` loop around the query
    # loops it cost ~100-300 more bytes of register spills at D=256 on sm_90 (static report).
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for it in range(0, GROUPS * n_blocks):
        g = it // n_blocks
        start_m = lo + (it - g * n_blocks) * BLOCK_M
        g64 = g.to(tl.int64)
        offs_m = start_m + offs_m0
        q_ptrs = q_base + g64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
        do_ptrs = do_base + g64 * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
        lse_ptrs = lse_base + g64 * stride_lh + offs_m
        delta_ptrs = delta_base + g64 * stride_lh + offs_m
        if MASKED:
            row_ok = offs_m < L
            q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
            lse2 = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                q = tl.load(q_ptrs)
                do = tl.load(do_ptrs)
            else:
                q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
                do = tl.load(do_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            lse2 = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that saw nothing: P = 0
        if DOT_PREC != "ieee":
            lse2 = lse2 * _LOG2E
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        sT, tT = _scores(qkT, s_scale, scale_over_cap, s_cap, SOFTCAP, FAST_TANH)
        pT = _exp(sT - lse2[None, :], DOT_PREC == "ieee")
        if MASKED:
            pos_m = offs_m + off
            vis = _visible(offs_m[None, :] < L, pos_m, offs_n, kp, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, True)
            pT = tl.where(vis, pT, 0.0)
        if COMPUTE_DV:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        if COMPUTE_DK:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, KPM,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                     stride_dvb, stride_dvh, stride_dvn, stride_lb, stride_lh, stride_kpmb,
                     seqlen_q, seqlen_k, Hk, GROUPS, window, scale, s_scale, scale_over_cap, s_cap,
                     SEQ_BUCKET,
                     IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, COMPUTE_DK: tl.constexpr,
                     COMPUTE_DV: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hk
    kvh = pid_bh % Hk
    L, q_tok = _segment(CU_Q, b, seqlen_q, IS_VARLEN)
    S, k_tok = _segment(CU_K, b, seqlen_k, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= S:
        return
    stride_qb, stride_qh, stride_qm = _units(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _units(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _units(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _units(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dkb, stride_dkh, stride_dkn = _units(stride_dkb, stride_dkh, stride_dkn, STRIDE_ALIGN)
    stride_dvb, stride_dvh, stride_dvn = _units(stride_dvb, stride_dvh, stride_dvn, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b64 * stride_kb + kvh64 * stride_kh + k_tok * stride_kn + offs_n[:, None] * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh64 * stride_vh + k_tok * stride_vn + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    kpm_base = KPM + b64 * stride_kpmb

    # the query rows that see this key block (_query_range); key rows >= S only give dK/dV rows never stored
    off = S - L
    lo, full_lo, full_hi, hi = _query_range(start_n, L, S, off, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, BLOCK_M,
                                            BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    h0 = (kvh * GROUPS).to(tl.int64)  # first query head of this kv head's group; GQA is reduced in-loop
    q_base = Q + b64 * stride_qb + h0 * stride_qh + q_tok * stride_qm
    do_base = DO + b64 * stride_dob + h0 * stride_doh + q_tok * stride_dom
    lse_base = LSE + b64 * stride_lb + h0 * stride_lh + q_tok
    delta_base = DELTA + b64 * stride_lb + h0 * stride_lh + q_tok
    if IS_CAUSAL:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, stride_qh, stride_qm,
                             stride_doh, stride_dom, stride_lh, lo, full_lo, GROUPS, offs_n, offs_m0, offs_d, L,
                             off, window, scale_over_cap, s_cap, s_scale, True, IS_CAUSAL, HAS_WINDOW,
                             HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC, COMPUTE_DK,
                             COMPUTE_DV)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, stride_qh, stride_qm,
                         stride_doh, stride_dom, stride_lh, full_lo, full_hi, GROUPS, offs_n, offs_m0, offs_d, L,
                         off, window, scale_over_cap, s_cap, s_scale, False, IS_CAUSAL, HAS_WINDOW,
                         HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC, COMPUTE_DK, COMPUTE_DV)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, stride_qh, stride_qm,
                         stride_doh, stride_dom, stride_lh, full_hi, hi, GROUPS, offs_n, offs_m0, offs_d, L,
                         off, window, scale_over_cap, s_cap, s_scale, True, IS_CAUSAL, HAS_WINDOW,
                         HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_M, DOT_PREC, COMPUTE_DK, COMPUTE_DV)
    if COMPUTE_DK:
        dk = dk * scale
        tl.store(DK + b64 * stride_dkb + kvh64 * stride_dkh + k_tok * stride_dkn + offs_n[:, None] * stride_dkn
                 + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    if COMPUTE_DV:
        tl.store(DV + b64 * stride_dvb + kvh64 * stride_dvh + k_tok * stride_dvn + offs_n[:, None] * stride_dvn
                 + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, lo, hi, pos_m, offs_n0, offs_d,
              S, window, s_scale, scale_over_cap, s_cap,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
              SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s, t = _scores(qk, s_scale, scale_over_cap, s_cap, SOFTCAP, FAST_TANH)
        p = _exp(s - lse2[:, None], DOT_PREC == "ieee")
        if MASKED:
            kp = None
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n, mask=offs_n < S, other=0)
            vis = _visible(offs_n[None, :] < S, pos_m, offs_n, kp, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, False)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, KPM,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom, stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh,
                   stride_kpmb, seqlen_q, seqlen_k, H, GROUPS, window, scale, s_scale, scale_over_cap, s_cap,
                   SEQ_BUCKET,
                   IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                   SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr, STRIDE_ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUPS
    L, q_tok = _segment(CU_Q, b, seqlen_q, IS_VARLEN)
    S, k_tok = _segment(CU_K, b, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= L:
        return
    stride_qb, stride_qh, stride_qm = _units(stride_qb, stride_qh, stride_qm, STRIDE_ALIGN)
    stride_kb, stride_kh, stride_kn = _units(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
    stride_vb, stride_vh, stride_vn = _units(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
    stride_dob, stride_doh, stride_dom = _units(stride_dob, stride_doh, stride_dom, STRIDE_ALIGN)
    stride_dqb, stride_dqh, stride_dqm = _units(stride_dqb, stride_dqh, stride_dqm, STRIDE_ALIGN)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_tok * stride_qm + offs_m[:, None] * stride_qm
                + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + q_tok * stride_dom + offs_m[:, None] * stride_dom
                 + offs_d[None, :], mask=row_mask, other=0.0)
    lse2 = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_tok + offs_m, mask=offs_m < L,
                   other=float("inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that saw nothing: P = 0
    if DOT_PREC != "ieee":
        lse2 = lse2 * _LOG2E
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_tok + offs_m, mask=offs_m < L, other=0.0)
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_tok * stride_kn
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_tok * stride_vn
    kpm_base = KPM + b64 * stride_kpmb

    off = S - L  # same key ranges as the forward
    pos_m = offs_m + off
    lo, full_lo, full_hi, hi = _key_range(start_m, L, S, off, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, BLOCK_M,
                                          BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_WINDOW:
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, lo, full_lo, pos_m,
                       offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap, True, IS_CAUSAL,
                       HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, full_lo, full_hi, pos_m,
                   offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap, False, IS_CAUSAL,
                   HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kpm_base, stride_kn, stride_vn, full_hi, hi, pos_m,
                   offs_n0, offs_d, S, window, s_scale, scale_over_cap, s_cap, True, IS_CAUSAL,
                   HAS_WINDOW, HAS_KPM, SOFTCAP, FAST_TANH, EVEN_D, HEAD_DIM, BLOCK_N, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + q_tok * stride_dqm + offs_m[:, None] * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_mask)


# ---- configs: per kernel, head-dim class, dtype width and device capability ------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Candidates were chosen with the static resource report (no spills,
# shared memory inside the device's per-block limit; see tests/test_softcap_attention.py and the README).

_CPU_CONFIG = {"fwd": (32, 16, 4, 1), "dq": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dk": (16, 32, 4, 1),
               "dv": (16, 32, 4, 1), "pre": (32, 0, 4, 1)}

# kind -> block_d class -> element bytes -> "sm90" (Hopper and newer) / "sm80" (Ampere, Ada) -> candidates.
# Every entry compiles without register spills for its target (tests/test_softcap_attention.py::test_static_*);
# neighbours that spilled are noted so nobody re-adds them blindly. fp32 uses exact fp32 dots (FMA, no tensor
# cores: tf32 would miss the fp32 accuracy rule) and only small tiles stay spill-free there (at D=256 every
# tile from 32 x 32 up spilled, with tf32x3 too); fp32 is the correctness path, bf16/fp16 the fast one.
_GPU_CONFIGS = {
    "fwd": {
        64: {2: {"sm90": [(128, 64, 8, 3), (128, 128, 8, 2)], "sm80": [(128, 64, 8, 3), (64, 64, 4, 3)]},
             4: {"sm90": [(32, 32, 4, 2)], "sm80": [(32, 32, 4, 2)]}},
        # D=128 sm_80: (128, 64, 8, 3) and (128, 128, 8, 2) spill 16 B
        128: {2: {"sm90": [(128, 64, 8, 3), (128, 128, 8, 2)], "sm80": [(64, 64, 4, 3)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 16, 4, 1)]}},
        # D=256 sm_90: (128, 64, 8, 2) spills 8 B, (64, 64, 4, 2) 104 B; sm_80: every BLOCK_M=128 tile spills
        256: {2: {"sm90": [(128, 32, 8, 2), (128, 32, 8, 3)], "sm80": [(64, 64, 8, 2), (64, 32, 8, 2)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 16, 4, 1)]}},
    },
    "dq": {
        64: {2: {"sm90": [(128, 64, 8, 2), (128, 32, 8, 2)], "sm80": [(128, 64, 8, 2), (128, 32, 8, 2)]},
             4: {"sm90": [(16, 16, 4, 1)], "sm80": [(32, 32, 4, 2)]}},
        # fp32 D=128 sm_90: (16, 16, 4, 1) spills 8 B, (16, 32, 4, 1) 256 B
        128: {2: {"sm90": [(128, 64, 8, 2), (128, 32, 8, 2)], "sm80": [(64, 64, 4, 2), (128, 32, 8, 2)]},
              4: {"sm90": [(16, 16, 8, 1)], "sm80": [(16, 16, 4, 1)]}},
        # D=256 sm_90: (64, 64, 8, 2) spills 192 B, (64, 32, 4, 2) 96 B
        # sm_80: (64, 32, 4, 2) spills 8 B in the key-padding-mask variant
        256: {2: {"sm90": [(128, 32, 8, 2), (128, 32, 8, 3)], "sm80": [(64, 64, 8, 2)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 16, 4, 1)]}},
    },
    "dkdv": {  # fused dK + dV (D <= 128)
        64: {2: {"sm90": [(64, 128, 8, 2), (32, 128, 8, 2)], "sm80": [(64, 128, 8, 2), (32, 128, 8, 2)]},
             4: {"sm90": [(16, 16, 4, 1)], "sm80": [(32, 32, 4, 2)]}},
        # D=128 sm_90: (64, 128, 8, 2) spills 112 B, (64, 64, 8, 2) 48 B
        128: {2: {"sm90": [(32, 128, 8, 2)], "sm80": [(64, 64, 8, 2), (32, 64, 4, 2)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 16, 4, 1)]}},
    },
    "dk": {  # D=256 sm_90: (32, 128, 8, 2) and (32, 64, 8, 3) spill 8 B, (64, 64, 8, 1) 784 B
        256: {2: {"sm90": [(32, 64, 8, 2), (16, 128, 8, 2)], "sm80": [(32, 64, 8, 2), (64, 64, 8, 1)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 32, 4, 2)]}},
    },
    "dv": {
        # sm_80: (32, 128, 8, 2) spills 8 B in the key-padding-mask variant, (64, 32, 8, 2) 16 B packed causal
        256: {2: {"sm90": [(64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2)],
                  "sm80": [(64, 64, 8, 2), (32, 64, 8, 2)]},
              4: {"sm90": [(16, 16, 4, 1)], "sm80": [(16, 16, 4, 1)]}},
    },
    "pre": {d: {e: {"sm90": [(bm, 0, 4, 1)], "sm80": [(bm, 0, 4, 1)]}
                for e, bm in ((2, 128 * 64 // d), (4, 64 * 64 // d))} for d in (64, 128, 256)},
}

# Configs that spill only in the packed non-causal variant (packed cross-attention): skipped there (every D).
_SPILL_PACKED_CROSS = {("fwd", 256, "sm90"): {(128, 32, 8, 3)},  # 16 B
                       ("dv", 256, "sm80"): {(64, 64, 8, 2)}}  # 32 B
# Configs that spill only when D < BLOCK_D (the masked d lanes cost registers), outside packed cross-attention:
# skipped for those dims. fwd sm_90 (128, 32, 8, 2): 8 B at D = 160 and 192, none at 256, so those take the
# 3-stage tile, which in turn spills 16 B packed cross (as at 256), where the 2-stage one is spill-free again.
_SPILL_PADDED_D = {("fwd", 256, "sm90"): {(128, 32, 8, 2)}}

# per-block shared memory of the device (opt-in maximum): H100 228 KB (227 usable), A100 164 KB (163 usable),
# consumer Ampere/Ada 100 KB (99 usable)
SHARED_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (12, 0): 101376}


def _block_d(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot a reduction dim of at least 16 (the mma / wgmma K step)
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dim(head_dim: int, what: str = "q") -> None:
    """ValueError naming the dim unless 1 <= head_dim <= MAX_HEAD_DIM (the kernel's contract)."""
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"softcap_attention: head dim D = {head_dim} ({what}) is outside the kernel's range "
                         f"1..{MAX_HEAD_DIM}: D must be >= 1 and <= {MAX_HEAD_DIM} (the tile configs stop at "
                         f"{MAX_HEAD_DIM} lanes); softcap_attention_reference takes any D")


def head_dim_padding(head_dim: int) -> tuple[int, float]:
    """(BLOCK_D, wasted fraction) for a head dim: the kernels compute on BLOCK_D = max(16, next power of two of D)
    lanes with masked loads, so 1 - D / BLOCK_D of every d-wide matmul is padding (72 -> 128: 0.4375)."""
    check_head_dim(head_dim, "head_dim")
    block_d = _block_d(head_dim)
    return block_d, 1.0 - head_dim / block_d


def _d_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _smem_estimate(kind, bm, bn, stages, block_d, elem):
    """Rough bytes of shared memory (operand tiles times pipeline stages); only used to drop configs on small
    devices before compiling. The static checks read the real number off the compiled kernel."""
    if kind == "fwd":
        return bm * block_d * elem + stages * 2 * bn * block_d * elem + bm * bn * elem
    if kind == "dq":
        return 2 * bm * block_d * elem + stages * 2 * bn * block_d * elem + bm * bn * elem
    if kind == "dkdv":
        return 2 * bn * block_d * elem + stages * 2 * bm * block_d * elem + bm * bn * elem
    return 0


def config_tuples(kind: str, head_dim: int, dtype: torch.dtype, capability=(9, 0), *,
                  packed_cross: bool = False) -> list[tuple]:
    """The autotune candidates for one kernel: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...].
    packed_cross: the call is packed (varlen) and non-causal."""
    if INTERPRET:
        return [_CPU_CONFIG[kind]]
    block_d = _block_d(head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    arch = "sm90" if capability[0] >= 9 else "sm80"
    cands = _GPU_CONFIGS[kind][_d_class(block_d)][2 if elem <= 2 else 4][arch]
    if head_dim != block_d and not packed_cross:
        cands = [c for c in cands if c not in _SPILL_PADDED_D.get((kind, _d_class(block_d), arch), ())]
    if packed_cross:
        cands = [c for c in cands if c not in _SPILL_PACKED_CROSS.get((kind, _d_class(block_d), arch), ())]
    if tuple(capability) in ((8, 0), (9, 0)):  # checked exactly by the static tests
        return cands[:1] if _NO_AUTOTUNE else list(cands)
    limit = SHARED_LIMIT.get(tuple(capability), 101376)
    fits = [c for c in cands if _smem_estimate(kind, c[0], c[1], c[3], block_d, elem) <= limit]
    if not fits:  # smallest tile, one stage
        bm, bn, w, _ = min(cands, key=lambda c: c[0] * c[1])
        fits = [(bm, bn, w, 1)]
    return fits[:1] if _NO_AUTOTUNE else fits


def _to_config(kind, c):
    kw = {"BLOCK_M": c[0]} if kind == "pre" else {"BLOCK_M": c[0], "BLOCK_N": c[1]}
    return triton.Config(kw, num_warps=c[2], num_stages=c[3])


def _all_configs(kind):
    seen = {_CPU_CONFIG[kind]}
    for by_elem in _GPU_CONFIGS[kind].values():
        for by_arch in by_elem.values():
            for cands in by_arch.values():
                seen.update(cands)
    return [_to_config(kind, c) for c in sorted(seen)]


def _pruner(kind, tensor_arg):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t = args[tensor_arg]
        kind_ = kind
        if kind == "dkdv" and not (args["COMPUTE_DK"] and args["COMPUTE_DV"]):
            kind_ = "dk" if args["COMPUTE_DK"] else "dv"
        cap = torch.cuda.get_device_capability(t.device) if t.is_cuda and not INTERPRET else (9, 0)
        packed_cross = bool(args["IS_VARLEN"]) and not args.get("IS_CAUSAL", True)
        return [_to_config(kind_, c) for c in config_tuples(kind_, args["HEAD_DIM"], t.dtype, cap,
                                                            packed_cross=packed_cross)]
    return prune


_KEY = ["SEQ_BUCKET", "HEAD_DIM", "IS_VARLEN", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "SOFTCAP"]
_fwd = triton.autotune(configs=_all_configs("fwd"), key=_KEY + ["GROUPS"],
                       prune_configs_by={"early_config_prune": _pruner("fwd", "Q")})(_fwd_kernel)
_dq = triton.autotune(configs=_all_configs("dq"), key=_KEY + ["GROUPS"],
                      prune_configs_by={"early_config_prune": _pruner("dq", "Q")})(_bwd_dq_kernel)
_dkdv = triton.autotune(configs=_all_configs("dkdv"), key=_KEY + ["GROUPS", "COMPUTE_DK", "COMPUTE_DV"],
                        prune_configs_by={"early_config_prune": _pruner("dkdv", "Q")})(_bwd_dkdv_kernel)
_pre = triton.autotune(configs=_all_configs("pre"), key=["HEAD_DIM", "IS_VARLEN"],
                       prune_configs_by={"early_config_prune": _pruner("pre", "O")})(_bwd_preprocess)


# ---- launchers -------------------------------------------------------------------------------------------


def _dot_prec(dtype):
    # fp32 inputs: exact fp32 products (Triton's default for an fp32 dot on the GPU is tf32, ~1e-3)
    return "ieee" if dtype == torch.float32 else "tf32"


def _fast_tanh(dtype):
    return dtype == torch.bfloat16 and not INTERPRET


def _stride_align(strides) -> int:
    """The largest power of two <= 16 dividing every stride (elements) the kernels take: they are passed divided by
    it and multiplied back by the constexpr inside (_units). 1 when any stride reaches 2^31 / 16: a unit stride
    could then be an i32 whose product with the alignment overflows (the element stride itself would be an i64)."""
    vals = [abs(int(x)) for x in strides]
    if any(x >= 2 ** 31 // 16 for x in vals):
        return 1
    a = 16
    while a > 1 and any(x % a for x in vals):
        a //= 2
    return a


def _in_units(strides):
    """(strides // a, a) with a = _stride_align(strides), or (strides, 1) when a = 16: Triton's own launch-time
    specialisation then marks them 16-divisible, and the kernels compile exactly as they did before the hint (with
    unit strides times 16 instead, the sm_90 dV kernel at D = 256 packed spilled 16 B: static report)."""
    a = _stride_align(strides)
    if a == 16:
        return [int(x) for x in strides], 1
    return [int(x) // a for x in strides], a


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


class _Geometry:
    """Everything the launchers need about one call: batch/segment count, lengths, per-tensor strides."""

    def __init__(self, q, k, cu_q, max_q, max_k):
        self.varlen = cu_q is not None
        if self.varlen:
            self.B = cu_q.numel() - 1
            self.H, self.Hk, self.D = q.shape[1], k.shape[1], q.shape[2]
            self.L, self.S = int(max_q), int(max_k)
        else:
            self.B, self.H, self.L, self.D = q.shape
            self.Hk, self.S = k.shape[1], k.shape[2]
        self.groups = self.H // self.Hk
        self.block_d = _block_d(self.D)

    def strides(self, t):
        """(batch, head, token) strides; the packed layout has no batch stride (segments index tokens)."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_empty(self, q):
        if self.varlen:
            lse = torch.empty(self.H, q.shape[0], device=q.device, dtype=torch.float32)
            return lse, (0, lse.stride(0))
        lse = torch.empty(self.B, self.H, self.L, device=q.device, dtype=torch.float32)
        return lse, (lse.stride(0), lse.stride(1))

    def lse_strides(self, lse):
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def _scalars(scale, softcap, dtype):
    """(s_scale, scale_over_cap, s_cap): scores are s = qk * s_scale, or tanh(qk * scale_over_cap) * s_cap, in
    log2 units for 16-bit inputs and natural units for fp32 (see _exp)."""
    unit = 1.0 if dtype == torch.float32 else 1.4426950408889634
    if softcap:
        return scale * unit, scale / softcap, softcap * unit
    return scale * unit, 1.0, 1.0


def _prep(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _kpm_arg(kpm, q):
    if kpm is None:
        return q, 0  # never read (HAS_KPM=False): any pointer
    kpm = kpm.to(torch.uint8).contiguous()
    return kpm, kpm.stride(0)


def _forward(q, k, v, cu_q, cu_k, kpm, max_q, max_k, scale, softcap, causal, window):
    q, k, v = _prep(q), _prep(k), _prep(v)
    g = _Geometry(q, k, cu_q, max_q, max_k)
    out = torch.empty_like(q)
    lse, (slb, slh) = g.lse_empty(q)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    kpm_t, s_kpm = _kpm_arg(kpm, q)
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    sl2, soc, cl2 = _scalars(scale, softcap, q.dtype)
    grid = lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)
    st, align = _in_units([*g.strides(q), *g.strides(k), *g.strides(v), *g.strides(out)])
    _fwd[grid](q, k, v, out, lse, cq, ck, kpm_t, *st,
               slb, slh, s_kpm, g.L, g.S, g.H, g.groups, int(window or 0), sl2, soc, cl2, _bucket(g.L),
               IS_VARLEN=g.varlen, IS_CAUSAL=bool(causal), HAS_WINDOW=bool(window), HAS_KPM=kpm is not None,
               SOFTCAP=bool(softcap), FAST_TANH=_fast_tanh(q.dtype), HEAD_DIM=g.D, BLOCK_D=g.block_d,
               DOT_PREC=_dot_prec(q.dtype), STRIDE_ALIGN=align)
    return out, lse


def _backward(do, q, k, v, out, lse, dlse, cu_q, cu_k, kpm, max_q, max_k, scale, softcap, causal, window):
    q, k, v, out, do = _prep(q), _prep(k), _prep(v), _prep(out), _prep(do)
    g = _Geometry(q, k, cu_q, max_q, max_k)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    lse = lse.contiguous()
    slb, slh = g.lse_strides(lse)
    delta = torch.empty_like(lse)
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    # one alignment for every launch of this backward: the strides of q, k, v, out, dO and of dq, dk, dv
    st_q, st_k, st_v, st_o, st_do, st_dq, st_dk, st_dv = (g.strides(t) for t in (q, k, v, out, do, dq, dk, dv))
    _, align = _in_units([*st_q, *st_k, *st_v, *st_o, *st_do, *st_dq, *st_dk, *st_dv])
    st_q, st_k, st_v, st_o, st_do, st_dq, st_dk, st_dv = ([x // align for x in t] for t in
                                                          (st_q, st_k, st_v, st_o, st_do, st_dq, st_dk, st_dv))
    _pre[lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)](
        out, do, delta, cq, *st_o, *st_do, slb, slh, g.L, g.H,
        IS_VARLEN=g.varlen, HEAD_DIM=g.D, BLOCK_D=g.block_d, STRIDE_ALIGN=align)
    if dlse is not None:  # d lse_i / d s_ij = P_ij: folds into delta (ds = P * (dP - delta + dlse))
        delta = delta - dlse.to(torch.float32)
    kpm_t, s_kpm = _kpm_arg(kpm, q)
    sl2, soc, cl2 = _scalars(scale, softcap, q.dtype)
    flags = dict(IS_VARLEN=g.varlen, IS_CAUSAL=bool(causal), HAS_WINDOW=bool(window), HAS_KPM=kpm is not None,
                 SOFTCAP=bool(softcap), FAST_TANH=_fast_tanh(q.dtype), HEAD_DIM=g.D, BLOCK_D=g.block_d,
                 DOT_PREC=_dot_prec(q.dtype), STRIDE_ALIGN=align)
    # D > 128: dK and dV in two passes of the same kernel (one fp32 accumulator each). Fused, the two
    # 64 x 256 fp32 accumulators spill on sm_90 at every block shape tried (static report); the split costs one
    # extra Q.K^T recompute (8 instead of 7 matmul passes over the scores in the whole backward).
    passes = [(True, True)] if g.block_d <= 128 else [(True, False), (False, True)]
    for compute_dk, compute_dv in passes:
        _dkdv[lambda meta: (triton.cdiv(g.S, meta["BLOCK_N"]), g.B * g.Hk)](
            q, k, v, do, lse, delta, dk, dv, cq, ck, kpm_t, *st_q, *st_k, *st_v, *st_do, *st_dk, *st_dv, slb, slh,
            s_kpm, g.L, g.S, g.Hk, g.groups,
            int(window or 0), scale, sl2, soc, cl2, _bucket(g.S), COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv,
            **flags)
    _dq[lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)](
        q, k, v, do, lse, delta, dq, cq, ck, kpm_t, *st_q, *st_k, *st_v, *st_do, *st_dq, slb, slh, s_kpm,
        g.L, g.S, g.H, g.groups, int(window or 0), scale,
        sl2, soc, cl2, _bucket(g.L), **flags)
    return dq, dk, dv


# ---- torch.library ops -----------------------------------------------------------------------------------


def _check_runnable(q):
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("florenz softcap_attention: tensors are on the CPU but the Triton kernels were built "
                           "for the GPU; set TRITON_INTERPRET=1 before importing florenz_kernels.softcap_attention "
                           "to run them in the interpreter")


@torch.library.custom_op("florenz::softcap_attention_fwd", mutates_args=())
def softcap_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                          max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: float, causal: bool,
                          window: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_runnable(q)
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k, scale,
                    softcap, causal, window)


@softcap_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k, scale, softcap, causal,
      window):
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("florenz::softcap_attention_bwd", mutates_args=())
def softcap_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                          cu_seqlens_k: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                          max_seqlen_q: int, max_seqlen_k: int, scale: float, softcap: float, causal: bool,
                          window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_runnable(q)
    return _backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q,
                     max_seqlen_k, scale, softcap, causal, window)


@softcap_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k,
      scale, softcap, causal, window):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, kpm, max_q, max_k, scale, softcap, causal, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, kpm)
    ctx.args = (max_q, max_k, scale, softcap, causal, window)


def _backward_formula(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, kpm = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = softcap_attention_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, kpm, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


softcap_attention_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


# ---- public API ------------------------------------------------------------------------------------------


def softcap_attention(q, k, v, *, softcap: float = 0.0, scale: float | None = None, causal: bool = True,
                      window: int | None = None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                      max_seqlen_k=None, key_padding_mask=None):
    """Fused softcapped attention (Gemma-2), forward and backward: causal, sliding window, GQA, packed or padded.

    Args:
      q: queries, fp16 / bf16 / fp32. Padded layout (B, H, L, D); packed layout (T, H, D) (all segments'
        tokens concatenated). Any 1 <= D <= 256 (padded inside to a power of two, masked: see the module
        docstring's "Head dims"; head_dim_padding(D) gives the wasted fraction). Any strides with a contiguous
        last dim (e.g. the (B, L, H, D) -> (B, H, L, D) transpose view of a projection output: no copy).
      k, v: keys and values, q's dtype and head dim, equal shapes: padded (B, Hk, S, D), packed (Tk, Hk, D).
        H must be a multiple of Hk (GQA: query head h reads kv head h // (H // Hk); K/V are never expanded).
      softcap: logit softcap c; c > 0: s = c * tanh(s / c), applied to the scaled scores before masking; 0 = none.
      scale: score scale, s = scale * q.k; None = D**-0.5.
      causal: bottom-right aligned causal mask: query i of a segment with L queries and S keys sits at position
        p(i) = i + S - L and sees the keys j <= p(i) (for L == S: j <= i; for one decode query: every key).
        False: every (unpadded) key is visible (cross-attention, bidirectional encoders).
      window: sliding window W (needs causal): query i also needs p(i) - j < W, i.e. it sees itself and the W - 1
        keys before it (transformers' Gemma-2 `kv_idx > q_idx - W`). None or 0 = no window.
      cu_seqlens_q, cu_seqlens_k: packed layout only, both or neither: (N + 1,) int32 (other integer dtypes are
        converted) cumulative segment lengths, cu[0] = 0, cu[N] = T (resp. Tk). Query segment n attends only to
        key segment n (block-diagonal); segments may be empty (zero-length padding segments keep shapes static).
      max_seqlen_q, max_seqlen_k: packed layout: the longest query / key segment (Python ints), which sizes the
        launch grid. None = computed from cu_seqlens: a device-to-host sync and, under torch.compile, a graph
        break: pass them (the loader knows them) in training and when compiling. Ignored for the padded layout.
      key_padding_mask: padded layout only: (B, S) bool, True = a real key, False = padding that no query sees
        (an integer mask counts nonzero as True). None = every key is real.

    Returns:
      (out, lse): out in q's dtype with q's shape and strides, padded (B, H, L, D) / packed (T, H, D);
      lse = log(sum_j exp(s_ij)) over the visible keys (natural log, fp32), padded (B, H, L) / packed (H, T).
      A query that sees no key gets out = 0 and lse = -inf (and zero gradients). Both are differentiable
      (d lse / d s = P): autograd runs the Triton backward (`florenz::softcap_attention_bwd`), deterministic.

    Softmax in fp32, P @ V accumulated in fp32; no dropout. CPU tensors need TRITON_INTERPRET=1 set before this
    module is imported (the interpreter); the ops are `florenz::softcap_attention_fwd` / `_bwd`.
    """
    check_attention_inputs(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, name="softcap_attention",
                           check_values=False)
    packed = cu_seqlens_q is not None
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"softcap_attention: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    check_head_dim(q.shape[-1], f"q shape {tuple(q.shape)}")
    if window is not None and window < 0:
        raise ValueError(f"softcap_attention: window must be >= 0, got {window}")
    if packed:
        cu_seqlens_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
        cu_seqlens_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    else:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return softcap_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, int(max_seqlen_q),
                                 int(max_seqlen_k), float(scale), float(softcap or 0.0), bool(causal),
                                 int(window or 0))


# ---- static checks (no GPU): compile every config for a target, read registers / spills / shared memory ----

_KERNELS = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel", "dk": "_bwd_dkdv_kernel",
            "dv": "_bwd_dkdv_kernel", "pre": "_bwd_preprocess"}
_FLOAT_ARGS = {"scale", "s_scale", "scale_over_cap", "s_cap"}
_F32_PTRS = {"LSE", "DELTA"}
_PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "CU_Q", "CU_K", "KPM"}


def static_resource_report(kind: str, head_dim: int, dtype: torch.dtype, capability: tuple[int, int], config: tuple,
                           *, varlen=False, causal=True, window=True, kpm=False, softcap=True,
                           split=None, stride_align: int | None = None) -> dict:
    """Compile one kernel config for `capability` on this (GPU-less) machine and read the cubin's resource usage
    (florenz_kernels._static.compile_report). Needs TRITON_INTERPRET unset when this module was imported.

    stride_align: the largest power of two <= 16 dividing every stride (_stride_align). 16: the strides are
    compiled as 16-divisible arguments with STRIDE_ALIGN = 1 (what the launch does then, see _in_units); below 16:
    STRIDE_ALIGN = stride_align with unit strides of unknown divisibility. None = what a contiguous or transposed
    tensor of this head dim guarantees: every stride is a multiple of D, so gcd(D, 16) (72 -> 8, 40 -> 8, 100 -> 4)."""
    import math

    from ._static import compile_report

    if stride_align is None:
        stride_align = math.gcd(head_dim, 16)

    fn = globals()[_KERNELS[kind]]
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    const = dict(IS_VARLEN=varlen, IS_CAUSAL=causal, HAS_WINDOW=window, HAS_KPM=kpm, SOFTCAP=softcap,
                 FAST_TANH=(dtype == torch.bfloat16), HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                 DOT_PREC=_dot_prec(dtype), STRIDE_ALIGN=1 if stride_align == 16 else stride_align,
                 BLOCK_M=config[0], BLOCK_N=config[1])
    if kind in ("dkdv", "dk", "dv"):  # fused, or dK / dV alone (the D > 128 split)
        const.update(COMPUTE_DK=kind in ("dkdv", "dk"), COMPUTE_DV=kind in ("dkdv", "dv"))

    def arg_type(name):
        if name in _PTRS:
            return "*fp32" if name in _F32_PTRS else "*i32" if name.startswith("CU_") else "*u8" if name == "KPM" \
                else "*" + ty
        return "fp32" if name in _FLOAT_ARGS else "i32"

    def aligned(name):
        if name in _PTRS:
            return True
        # strides: 16-divisible as passed, or in units of stride_align (< 16) of unknown divisibility
        return stride_align == 16 and name.startswith("stride_") and not name.startswith("stride_l") \
            and name != "stride_kpmb"

    report = compile_report(fn, const, arg_type, aligned, capability, num_warps=config[2], num_stages=config[3])
    report.update(kind=kind, head_dim=head_dim, dtype=ty, config=tuple(config), stride_align=stride_align)
    return report
