"""Softcapped attention, the Hopper path (opt-in): TMA tensor-descriptor loads, a pipelined K/V loop, one kernel for
dK/dV with dQ by fp32 atomics. Same contract as florenz_kernels.softcap_attention (read its docstring: layouts,
masks, GQA, varlen, lse); the default kernels stay there and stay the default until a GPU measurement shows this
path faster (issue 20: unmeasured so far, no GPU lent).

    softcap_attention_hopper(q, k, v, *, softcap=0.0, scale=None, causal=True, window=None, cu_seqlens_q=None,
                             cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, key_padding_mask=None,
                             deterministic=False) -> (out, lse)

Shape legend: B batch, H query heads, Hk key/value heads, G = H // Hk (GQA group), L queries, S keys, D head dim
(<= 256), T / Tk packed query / key tokens, N packed segments.

What differs from the sm_80-style kernels
  Loads: `tl.make_tensor_descriptor` per (segment, head) slab, shape [rows of the segment, D]: the TMA unit
    zero-fills rows past the segment and columns past D, so the loads carry no mask arithmetic, and the output
    store clips at the segment end (varlen never writes into the next segment). The backward reads the G query
    heads of a kv head through one 3-D descriptor [G, L, D]. USE_TMA=False is the same kernel with masked pointer
    loads: used where the strides or the base address are not 16-byte aligned (TMA's rule), and selectable for a
    comparison. The Triton interpreter runs tensor descriptors (numpy emulation), so the CPU tests run the TMA
    path itself; only the TMA reduce-add of dQ (DQ_TMA) has no interpreter emulation: the CPU tests run dQ with
    pointer atomics, and the GPU test runs the TMA reduce-add.
  K/V loop: `tl.range` over the unmasked interior, software-pipelined by the config's num_stages (the TMA loads
    of block j + 1 in flight under the wgmmas of block j). Not warp-specialised: with Triton 3.8, sm_90 and
    `tl.range(..., warp_specialize=True)` the compiled loop keeps the attribute but gets no producer/consumer
    partitions (no ttg.warp_specialize region, no setmaxnreg in the PTX; registers, shared memory and HGMMA
    count identical to the plain loop: checked at 128 x 64, causal and not), so the flag is not offered.
  Softcap: s = c * tanh(qk * scale / c) with the scale folded into one multiplier and c * log2(e) into the other
    (scores live in log2 units, so the softmax is one exp2 per score). The tanh itself (TANH constexpr):
      2 `tanh.approx.f32` (1 MUFU.TANH per score; max rel. error 2^-11, below bf16's 2^-9 score rounding): bf16 on
        the GPU, the fewest special-function instructions;
      1 exp2-based: tanh(y) = 1 - 2 / (1 + 2^(2 log2(e) y)), 2 log2(e) folded into the same multiplier (1 MUFU.EX2
        + the approximate divide's MUFU.RCP); fp16, and bf16 in the interpreter (no inline asm there). Absolute
        error ~1 ulp(1) = 1.2e-7 in t, far below fp16's 2^-11 relative score rounding;
      0 accurate (florenz_kernels._tl_math.tanh_exp, series below 0.125): fp32, whose 2x rule sits at rounding level.
  Backward: one kernel per (key block, kv head) accumulates dK and dV in fp32 registers over the G heads and their
    query blocks (no two-pass dK/dV at D = 256, which the default path needs), and adds each query block's dQ
    contribution (ds^T k, fp32) into a zeroed fp32 buffer: pointer atomics, or a TMA reduce-add (DQ_TMA, sm_90).
    The atomics make dQ's summation order run-dependent; deterministic=True instead runs the default path's
    separate dQ kernel (bitwise reproducible) and this kernel with COMPUTE_DQ=False.
  delta = rowsum(dO * O) - dlse comes from the default path's preprocess kernel (same op, same configs).

Registered as `florenz::softcap_attention_hopper_fwd` / `_bwd` (torch.library, fake + autograd), next to the default
ops, which are untouched: selecting this path is calling softcap_attention_hopper (or these ops).

Device-side descriptors need a global scratch allocation per launch (128 bytes per descriptor per program): the
launchers install a torch allocator (triton.set_allocator) when none is set, in whatever thread launches (autograd
runs the backward in its own thread, and triton's allocator is a context variable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._tl_math import tanh, tanh_exp
from .reference import check_attention_inputs, softcap_attention_reference
from .softcap_attention import (
    INTERPRET,
    MAX_HEAD_DIM,
    _block_d,
    _bucket,
    _check_runnable,
    _dot_prec,
    _dq,
    _exp,
    _fast_tanh,
    _Geometry,
    _key_range,
    _kpm_arg,
    _pre,
    _prep,
    _query_range,
    _scalars,
    _segment,
    _visible,
)

__all__ = ["softcap_attention_hopper", "softcap_attention_reference", "HopperConfig", "CONFIGS", "config_list",
           "static_resource_report_hopper", "tma_ok"]

_NO_AUTOTUNE = os.environ.get("FLORENZ_NO_AUTOTUNE", "0") not in ("", "0")
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ---- device functions -----------------------------------------------------------------------------------


@triton.jit
def _tanh_exp2(x2):
    """tanh(y) from x2 = 2 log2(e) y (the factor folded into the caller's multiplier): 1 - 2 / (1 + 2^x2).
    2^x2 = inf gives 1, 2^x2 = 0 gives -1 exactly; one MUFU.EX2 and the approximate divide (MUFU.RCP)."""
    e = tl.math.exp2(x2)
    return 1.0 - tl.math.fdiv(2.0, 1.0 + e, ieee_rounding=False)


@triton.jit
def _hscores(qk, s_scale, tanh_in, s_cap, SOFTCAP: tl.constexpr, TANH: tl.constexpr):
    """(s, t) from raw q.k products: s = qk * s_scale, or with a softcap s = t * s_cap, t = tanh(qk * tanh_in)
    (tanh_in = scale / c, times 2 log2(e) for TANH == 1). t is what the softcap backward needs (1 - t^2)."""
    if SOFTCAP:
        x = qk * tanh_in
        if TANH == 2:
            t = tanh(x, True)
        elif TANH == 1:
            t = _tanh_exp2(x)
        else:
            t = tanh_exp(x)
        s = t * s_cap
    else:
        s = qk * s_scale
        t = s
    return s, t


@triton.jit
def _desc2(base, rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one (segment, head) slab: rows past `rows` and columns past HEAD_DIM read as zeros, stores there are dropped.
    # An empty segment (rows = 0: zero-length padding segments, a query segment whose key segment is empty) gets
    # one row, as a tensor map has no zero-size dims: its loop ranges are empty, so nothing is read or written.
    return tl.make_tensor_descriptor(base, shape=[tl.maximum(rows, 1), HEAD_DIM], strides=[stride_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_D])


@triton.jit
def _desc3(base, heads, rows, stride_head, stride_row, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_D: tl.constexpr):
    # the G query heads of one kv head (backward): one descriptor instead of one per head and loop step (rows >= 1
    # as in _desc2)
    return tl.make_tensor_descriptor(base, shape=[heads, tl.maximum(rows, 1), HEAD_DIM],
                                     strides=[stride_head, stride_row, 1],
                                     block_shape=[1, BLOCK_R, BLOCK_D])


@triton.jit
def _tile(src, row0, n_rows, stride_row, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """Rows [row0, row0 + BLOCK_R) of a 2-D slab, zeros past n_rows / HEAD_DIM: a TMA load through the
    descriptor `src`, or (USE_TMA=False, `src` is the slab's base pointer) a masked pointer load."""
    if USE_TMA:
        x = src.load([row0, 0])
    else:
        offs_r = row0 + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(src + offs_r[:, None] * stride_row + offs_d[None, :],
                    mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return x


@triton.jit
def _tile3(src, g, row0, n_rows, stride_head, stride_row, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """_tile of head g of a 3-D [G, rows, D] descriptor (or base pointer)."""
    if USE_TMA:
        x = src.load([g, row0, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        x = _tile(src + g.to(tl.int64) * stride_head, row0, n_rows, stride_row, False, HEAD_DIM, BLOCK_R, BLOCK_D)
    return x


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kpm_base, stride_kn, stride_vn, lo, hi, pos_m, offs_n0, S, window,
              s_scale, tanh_in, s_cap,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
              SOFTCAP: tl.constexpr, TANH: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = _tile(k_src, start_n, S, stride_kn, USE_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        s, _ = _hscores(qk, s_scale, tanh_in, s_cap, SOFTCAP, TANH)
        if MASKED:
            offs_n = start_n + offs_n0
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
        v = _tile(v_src, start_n, S, stride_vn, USE_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _hopper_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, KPM,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                       stride_vn, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, stride_kpmb,
                       seqlen_q, seqlen_k, H, GROUPS, window, s_scale, tanh_in, s_cap, SEQ_BUCKET,
                       IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, TANH: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_tok * stride_qm
    k_base = K + b64 * stride_kb + kvh.to(tl.int64) * stride_kh + k_tok * stride_kn
    v_base = V + b64 * stride_vb + kvh.to(tl.int64) * stride_vh + k_tok * stride_vn
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_tok * stride_om
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_tok
    kpm_base = KPM + b64 * stride_kpmb
    if USE_TMA:
        q_src = _desc2(q_base, L, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
        k_src = _desc2(k_base, S, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _desc2(v_base, S, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
    else:
        q_src = q_base
        k_src = k_base
        v_src = v_base

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = _tile(q_src, start_m, L, stride_qm, USE_TMA, HEAD_DIM, BLOCK_M, BLOCK_D)
    off = S - L  # bottom-right alignment: p(i) = i + off
    pos_m = offs_m + off
    lo, full_lo, full_hi, hi = _key_range(start_m, L, S, off, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, BLOCK_M,
                                          BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if HAS_WINDOW:  # the masked window edge
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kpm_base, stride_kn, stride_vn, lo, full_lo, pos_m,
                                  offs_n0, S, window, s_scale, tanh_in, s_cap, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM,
                                  SOFTCAP, TANH, USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    # the unmasked interior: the software-pipelined loop that carries the FLOPs
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kpm_base, stride_kn, stride_vn, full_lo, full_hi, pos_m,
                              offs_n0, S, window, s_scale, tanh_in, s_cap, False, IS_CAUSAL, HAS_WINDOW, HAS_KPM,
                              SOFTCAP, TANH, USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    # the masked diagonal / tail
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, k_src, v_src, kpm_base, stride_kn, stride_vn, full_hi, hi, pos_m,
                              offs_n0, S, window, s_scale, tanh_in, s_cap, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM,
                              SOFTCAP, TANH, USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PREC)
    empty = l_i == 0.0  # no visible key: zeros and lse = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(O.dtype.element_ty)
    if DOT_PREC == "ieee":  # natural units (see softcap_attention._exp)
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * _LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    if USE_TMA:
        _desc2(o_base, L, stride_om, HEAD_DIM, BLOCK_M, BLOCK_D).store([start_m, 0], out)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out,
                 mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)


@triton.jit
def _bwd_loop(dk, dv, k_src, v_src, stride_kn, stride_vn, start_n, q_src, do_src, dq_src, lse_base, delta_base,
              kpm_base, stride_qh, stride_qm, stride_doh, stride_dom, stride_dqh, stride_dqm, stride_lh, lo, hi, GROUPS,
              offs_n, offs_m0, L, off, window, s_scale, tanh_in, s_cap, dq_scale,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
              SOFTCAP: tl.constexpr, TANH: tl.constexpr, USE_TMA: tl.constexpr, COMPUTE_DQ: tl.constexpr,
              DQ_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    kp = None
    if MASKED and HAS_KPM:
        kp = tl.load(kpm_base + offs_n, mask=offs_n < L + off, other=0)
    offs_d = tl.arange(0, BLOCK_D)
    # one flat loop over (query head g of the GQA group, query block): software-pipelined across head boundaries
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for it in tl.range(0, GROUPS * n_blocks):
        g = it // n_blocks
        start_m = lo + (it - g * n_blocks) * BLOCK_M
        offs_m = start_m + offs_m0
        row_ok = offs_m < L
        q = _tile3(q_src, g, start_m, L, stride_qh, stride_qm, USE_TMA, HEAD_DIM, BLOCK_M, BLOCK_D)
        do = _tile3(do_src, g, start_m, L, stride_doh, stride_dom, USE_TMA, HEAD_DIM, BLOCK_M, BLOCK_D)
        g64 = g.to(tl.int64)
        lse2 = tl.load(lse_base + g64 * stride_lh + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_base + g64 * stride_lh + offs_m, mask=row_ok, other=0.0)
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that saw nothing: P = 0
        if DOT_PREC != "ieee":
            lse2 = lse2 * _LOG2E
        # Keys-first tiles (scores transposed, (BLOCK_N, BLOCK_M)): every dK/dV wgmma has M = BLOCK_N = 64 rows, so
        # BLOCK_M can be 32 and the score tiles stay small. K and V are re-read from shared memory... by a TMA load
        # per step (L2-resident), so they are always an smem operand: loaded once before the loop, Triton kept
        # them in registers as the A operand, replicated across the two warpgroups that split N (255 registers and
        # 400-1100 B of spills at every D = 256 tile tried; static report).
        k = _tile(k_src, start_n, L + off, stride_kn, USE_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
        v = _tile(v_src, start_n, L + off, stride_vn, USE_TMA, HEAD_DIM, BLOCK_N, BLOCK_D)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # (BLOCK_N, BLOCK_M)
        sT, tT = _hscores(qkT, s_scale, tanh_in, s_cap, SOFTCAP, TANH)
        pT = _exp(sT - lse2[None, :], DOT_PREC == "ieee")
        if MASKED:
            vis = _visible(row_ok[None, :], offs_m + off, offs_n, kp, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, True)
            pT = tl.where(vis, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT16 = dsT.to(q.dtype)
        dk = tl.dot(dsT16, q, dk, input_precision=DOT_PREC)
        if COMPUTE_DQ:
            # swapped operands: dQ^T = K^T dS^T has M = D = 256 rows (a wgmma shape at any BLOCK_M)
            dqT = tl.dot(tl.trans(k), dsT16, input_precision=DOT_PREC) * dq_scale  # (BLOCK_D, BLOCK_M) fp32
            dq_part = tl.trans(dqT)
            if DQ_TMA:
                dq_src.atomic_add([g, start_m, 0], dq_part.reshape(1, BLOCK_M, BLOCK_D))
            else:
                tl.atomic_add(dq_src + g64 * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :], dq_part,
                              mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def _hopper_bwd_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQA, CU_Q, CU_K, KPM,
                       stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                       stride_vn, stride_dob, stride_doh, stride_dom, stride_dkb, stride_dkh, stride_dkn,
                       stride_dvb, stride_dvh, stride_dvn, stride_dqb, stride_dqh, stride_dqm, stride_lb, stride_lh,
                       stride_kpmb, seqlen_q, seqlen_k, Hk, GROUPS, window, scale, s_scale, tanh_in, s_cap,
                       SEQ_BUCKET,
                       IS_VARLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, TANH: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
                       COMPUTE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
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
    b64 = b.to(tl.int64)
    kvh64 = kvh.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + k_tok * stride_kn
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + k_tok * stride_vn
    dk_base = DK + b64 * stride_dkb + kvh64 * stride_dkh + k_tok * stride_dkn
    dv_base = DV + b64 * stride_dvb + kvh64 * stride_dvh + k_tok * stride_dvn
    h0 = (kvh * GROUPS).to(tl.int64)  # first query head of this kv head's group; GQA is reduced in-loop
    q_base = Q + b64 * stride_qb + h0 * stride_qh + q_tok * stride_qm
    do_base = DO + b64 * stride_dob + h0 * stride_doh + q_tok * stride_dom
    dq_base = DQA + b64 * stride_dqb + h0 * stride_dqh + q_tok * stride_dqm
    lse_base = LSE + b64 * stride_lb + h0 * stride_lh + q_tok
    delta_base = DELTA + b64 * stride_lb + h0 * stride_lh + q_tok
    kpm_base = KPM + b64 * stride_kpmb
    if USE_TMA:
        k_src = _desc2(k_base, S, stride_kn, HEAD_DIM, BLOCK_N, BLOCK_D)
        v_src = _desc2(v_base, S, stride_vn, HEAD_DIM, BLOCK_N, BLOCK_D)
        q_src = _desc3(q_base, GROUPS, L, stride_qh, stride_qm, HEAD_DIM, BLOCK_M, BLOCK_D)
        do_src = _desc3(do_base, GROUPS, L, stride_doh, stride_dom, HEAD_DIM, BLOCK_M, BLOCK_D)
    else:
        k_src = k_base
        v_src = v_base
        q_src = q_base
        do_src = do_base
    if DQ_TMA:
        dq_src = _desc3(dq_base, GROUPS, L, stride_dqh, stride_dqm, HEAD_DIM, BLOCK_M, BLOCK_D)
    else:
        dq_src = dq_base

    # the query rows that see this key block, as in the default dK/dV kernel (_query_range)
    off = S - L
    lo, full_lo, full_hi, hi = _query_range(start_n, L, S, off, window, IS_CAUSAL, HAS_WINDOW, HAS_KPM, BLOCK_M,
                                            BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if IS_CAUSAL:  # the masked diagonal
        dk, dv = _bwd_loop(dk, dv, k_src, v_src, stride_kn, stride_vn, start_n, q_src, do_src, dq_src, lse_base,
                           delta_base, kpm_base, stride_qh, stride_qm, stride_doh, stride_dom, stride_dqh, stride_dqm,
                           stride_lh, lo, full_lo, GROUPS, offs_n, offs_m0, L, off, window, s_scale, tanh_in, s_cap,
                           scale, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, TANH, USE_TMA, COMPUTE_DQ, DQ_TMA,
                           HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC)
    # the unmasked interior, then the masked window edge / tail
    dk, dv = _bwd_loop(dk, dv, k_src, v_src, stride_kn, stride_vn, start_n, q_src, do_src, dq_src, lse_base,
                       delta_base, kpm_base, stride_qh, stride_qm, stride_doh, stride_dom, stride_dqh, stride_dqm,
                       stride_lh, full_lo, full_hi, GROUPS, offs_n, offs_m0, L, off, window, s_scale, tanh_in, s_cap,
                       scale, False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, TANH, USE_TMA, COMPUTE_DQ, DQ_TMA,
                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC)
    dk, dv = _bwd_loop(dk, dv, k_src, v_src, stride_kn, stride_vn, start_n, q_src, do_src, dq_src, lse_base,
                       delta_base, kpm_base, stride_qh, stride_qm, stride_doh, stride_dom, stride_dqh, stride_dqm,
                       stride_lh, full_hi, hi, GROUPS, offs_n, offs_m0, L, off, window, s_scale, tanh_in, s_cap,
                       scale, True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, SOFTCAP, TANH, USE_TMA, COMPUTE_DQ, DQ_TMA,
                       HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, DOT_PREC)
    dk = (dk * scale).to(DK.dtype.element_ty)
    dv = dv.to(DV.dtype.element_ty)
    if USE_TMA:
        _desc2(dk_base, S, stride_dkn, HEAD_DIM, BLOCK_N, BLOCK_D).store([start_n, 0], dk)
        _desc2(dv_base, S, stride_dvn, HEAD_DIM, BLOCK_N, BLOCK_D).store([start_n, 0], dv)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_DIM)
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk, mask=kv_mask)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv, mask=kv_mask)


# ---- configs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopperConfig:
    """One autotune candidate and the occupancy it claims. The static tests (tests/test_softcap_attention_hopper.py)
    compile it for sm_90 and hold the cubin to: HGMMA present, no spills, registers <= `registers` and
    registers x threads x ctas_per_sm <= 65536 (the SM's register file), shared <= `shared` (the budget in the
    comment next to the config) and shared x ctas_per_sm <= 233472 (228 KiB per SM; 227 KiB per block)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1
    registers: int = 255  # registers / thread the occupancy allows (255 = the per-thread maximum, see CONFIGS)
    shared: int = 232448  # expected shared bytes / block

    def triton(self) -> triton.Config:
        kw = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        return triton.Config(kw, num_warps=self.num_warps, num_stages=self.num_stages)


# The interpreter runs one small config (its cost is per program, not per tile).
_CPU = {"fwd": HopperConfig(32, 16, 4, 1), "bwd": HopperConfig(16, 32, 4, 1)}

# kind -> D class (block_d 64 / 128 / 256) -> element bytes (2 = fp16/bf16) -> candidates, best guess first.
# Budget arithmetic per config: registers from the fp32 accumulators and score tiles spread over the threads
# (32 x num_warps), shared memory from the TMA tiles times the pipeline stages (2 B per 16-bit element, 4 per fp32).
# Occupancy claims: 1 CTA / SM of 256 threads needs <= 255 registers (256 x 255 = 65280 <= 65536) and <= 227 KiB
# of shared memory; 2 CTAs / SM of 128 threads need <= 255 registers (2 x 128 x 256 = 65536) and <= 114 KiB each.
# "measured": the sm_90 cubins of the static test, bf16 causal + window / the range over its variants (varlen,
# key padding, packed cross, fp16's exp2 tanh, the backward's deterministic and pointer-atomic dQ, the pointer
# loads at D <= 128). fp32 has no Hopper configs: with exact fp32 dots (FMA) every tile tried spilled 1.8-9 KiB
# (16 x 16 included), so fp32 on the GPU stays on the default kernels.
CONFIGS: dict[str, dict[int, dict[int, list[HopperConfig]]]] = {
    "fwd": {  # (BLOCK_M queries per program, BLOCK_N keys per step, warps, stages)
        64: {2: [
            # 2 CTAs / SM (4 warps each): acc 128 x 64 fp32 / 128 threads = 64 regs, S 128 x 64 = 64, P 32, row stats
            # and addresses ~30: ~190 (measured 187 / 187-255). Shared: Q 128 x 64 x 2 = 16 KiB + 3 stages x (K + V
            # 64 x 64 x 2 x 2 = 16 KiB) = 64 KiB = 65536 B (measured 66560; 2 CTAs: 130 KiB <= 228 KiB).
            HopperConfig(128, 64, 4, 3, ctas_per_sm=2, shared=65536 + 2048),
            # acc 128 x 64 / 256 = 32, S 128 x 128 = 64, P 32, ~30: ~160 (measured 160 / 159-218). Shared: Q 16 KiB
            # + 2 x (K + V 128 x 64 x 2 x 2 = 32 KiB) = 80 KiB = 81920 B (measured 82944).
            HopperConfig(128, 128, 8, 2, shared=81920 + 2048),
        ]},
        128: {2: [
            # acc 128 x 128 / 256 = 64, S 128 x 64 = 32, P 16, ~40: ~150 (measured 154 / 153-252). Shared: Q
            # 128 x 128 x 2 = 32 KiB + 2 x (K + V 64 x 128 x 2 x 2 = 32 KiB) = 96 KiB = 98304 B (measured 98336).
            HopperConfig(128, 64, 8, 2, shared=98304 + 2048),
            # acc 64 + S 128 x 128 = 64 + P 32, ~30: ~190 (measured 188 / 188-255). Shared: Q 32 KiB + 2 x (K + V
            # 128 x 128 x 2 x 2 = 64 KiB) = 160 KiB = 163840 B (measured 164864).
            HopperConfig(128, 128, 8, 2, shared=163840 + 2048),
        ]},
        256: {2: [
            # acc 128 x 256 fp32 / 256 threads = 128 regs, S 128 x 64 fp32 = 32, P 16-bit = 16, ~40: ~215 (measured
            # 235 / 231-251). Shared: Q 128 x 256 x 2 = 64 KiB + 2 stages x (K + V 64 x 256 x 2 x 2 = 64 KiB)
            # = 192 KiB = 196608 B (measured 196640). 3 stages: 263168 B, over 227 KiB.
            HopperConfig(128, 64, 8, 2, shared=196608 + 1024),
            # acc 128 + S 128 x 32 = 16 + P 8, ~40: ~190 (measured 211 / 202-222). Shared: Q 64 KiB + 3 stages x
            # (K + V 32 x 256 x 2 x 2 = 32 KiB) = 160 KiB = 163840 B (measured 163896).
            HopperConfig(128, 32, 8, 3, shared=163840 + 1024),
        ]},
    },
    "bwd": {  # (BLOCK_M queries per step, BLOCK_N keys per program, warps, stages)
        64: {2: [
            # dK + dV 128 x 64 x 2 fp32 / 256 threads = 64 regs, dQ^T part 64 x 32 = 8, score tiles 128 x 32 fp32
            # (S^T, dP^T, P^T, dS^T) 4 x 16 = 64, addresses / masks ~60: ~200 (measured 202 / 170-230). Shared: K, V
            # 2 stages x (128 x 64 x 2 x 2 = 32 KiB) = 64 KiB, Q, dO 2 x (32 x 64 x 2 x 2 = 8 KiB) = 16 KiB, the dQ
            # tile for the TMA reduce 32 x 64 x 4 = 8 KiB, dS^T 128 x 32 x 2 = 8 KiB: 96 KiB = 98304 B (measured 98576).
            HopperConfig(32, 128, 8, 2, shared=98304 + 2048),
            # dK + dV 64, dQ^T 64 x 64 = 16, score tiles 128 x 64: 4 x 32 = 128, ~50: ~255 (measured 250 / 239-255).
            # Shared: K, V 64 KiB, Q, dO 2 x 16 KiB = 32 KiB, dQ tile 16 KiB, dS^T 16 KiB: 128 KiB = 131072 B.
            HopperConfig(64, 128, 8, 2, shared=131072 + 2048),
        ]},
        128: {2: [
            # dK + dV 64 x 128 x 2 fp32 / 256 = 64 regs, dQ^T 128 x 32 = 16, score tiles 64 x 32: 4 x 8 = 32, A
            # operands ~8, ~60: ~180 (measured 210 / 180-252). Shared: K, V 2 x (64 x 128 x 2 x 2 = 32 KiB) = 64 KiB,
            # Q, dO 2 x (32 x 128 x 2 x 2 = 16 KiB) = 32 KiB, dQ tile 32 x 128 x 4 = 16 KiB, dS^T 4 KiB: 116 KiB =
            # 118784 B (measured 119056). (64, 64, 8, 2) and (32, 128, 8, 2) spill 8 B.
            HopperConfig(32, 64, 8, 2, shared=118784 + 2048),
        ]},
        256: {2: [
            # dK + dV 64 x 256 x 2 fp32 / 256 threads = 128 regs, dQ^T part 256 x 16 fp32 = 16, score tiles
            # 64 x 16 fp32 (S^T, dP^T, P^T, dS^T) 4 x 4 = 16, the 16-bit A operands ~8, addresses / masks ~60:
            # ~230 (measured 249 / 222-255). Shared: K and V re-read per step, 2 stages x (64 x 256 x 2 x 2 =
            # 64 KiB) = 128 KiB, Q and dO 2 stages x (16 x 256 x 2 x 2 = 16 KiB) = 32 KiB, the dQ tile for the TMA
            # reduce 16 x 256 x 4 = 16 KiB, dS^T for the swapped dQ 64 x 16 x 2 = 2 KiB: 178 KiB = 182272 B
            # (measured 182416). BLOCK_M = 32 needs 233744 B (over 227 KiB); BLOCK_M 16 / 32 / 64 with one stage
            # spill 600-1000 B, BLOCK_N = 64 at 16 warps (128 registers) spills 0.6-2.4 KiB.
            HopperConfig(16, 64, 8, 2, shared=182272 + 1024),
        ]},
    },
}

def _tanh_mode(dtype: torch.dtype, gpu: bool) -> int:
    """2 = tanh.approx.f32 (bf16 on the GPU), 1 = the exp2 form (fp16; bf16 in the interpreter), 0 = accurate
    (fp32). See the module docstring."""
    if dtype == torch.float32:
        return 0
    return 2 if dtype == torch.bfloat16 and gpu else 1


def _hscalars(scale: float, softcap: float, dtype: torch.dtype, tanh_mode: int) -> tuple[float, float, float]:
    """(s_scale, tanh_in, s_cap): s = qk * s_scale, or t = tanh(qk * tanh_in) and s = t * s_cap; log2 units for
    16-bit inputs, natural for fp32 (softcap_attention._exp). The exp2-form tanh takes 2 log2(e) y as input."""
    unit = 1.0 if dtype == torch.float32 else 1.4426950408889634
    if not softcap:
        return scale * unit, 1.0, 1.0
    tanh_in = scale / softcap * (2.0 * 1.4426950408889634 if tanh_mode == 1 else 1.0)
    return scale * unit, tanh_in, softcap * unit


def _d_class(head_dim: int) -> int:
    bd = _block_d(head_dim)
    return 64 if bd <= 64 else (128 if bd <= 128 else 256)


def config_list(kind: str, head_dim: int, dtype: torch.dtype) -> list[HopperConfig]:
    """The autotune candidates of the forward ("fwd") or backward ("bwd") kernel for one head dim and dtype."""
    if INTERPRET:
        return [_CPU[kind]]
    cands = CONFIGS[kind][_d_class(head_dim)][4 if dtype == torch.float32 else 2]
    return cands[:1] if _NO_AUTOTUNE else list(cands)


def _all_configs(kind: str) -> list[triton.Config]:
    seen = {_CPU[kind]}
    for by_elem in CONFIGS[kind].values():
        for cands in by_elem.values():
            seen.update(cands)
    return [c.triton() for c in sorted(seen, key=lambda c: (c.block_m, c.block_n, c.num_warps, c.num_stages))]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [c.triton() for c in config_list(kind, args["HEAD_DIM"], args["Q"].dtype)]
    return prune


_KEY = ["SEQ_BUCKET", "HEAD_DIM", "GROUPS", "IS_VARLEN", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "SOFTCAP", "USE_TMA"]


def _autotuned():
    fwd = triton.autotune(configs=_all_configs("fwd"), key=_KEY,
                          prune_configs_by={"early_config_prune": _pruner("fwd")})
    # the autotuner times each candidate on the real buffers: the dQ accumulator must start at zero for every one
    bwd = triton.autotune(configs=_all_configs("bwd"), key=_KEY + ["COMPUTE_DQ", "DQ_TMA"], reset_to_zero=["DQA"],
                          prune_configs_by={"early_config_prune": _pruner("bwd")})
    return fwd(_hopper_fwd_kernel), bwd(_hopper_bwd_kernel)


_fwd, _bwd = _autotuned()


# ---- launchers -------------------------------------------------------------------------------------------


def tma_ok(*tensors: torch.Tensor) -> bool:
    """TMA's alignment rule for every tensor: a 16-byte aligned base, a contiguous last dim and 16-byte multiples as
    the other strides (then every per-program slab base, a sum of strides, is aligned too)."""
    for t in tensors:
        e = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any((st * e) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    # device-side descriptors live in a per-launch global scratch buffer; triton's allocator is a ContextVar, so
    # this runs in every launching thread (autograd's backward thread included), and a user's allocator wins
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc)


def _check_device(q):
    _check_runnable(q)
    if q.is_cuda and not INTERPRET:
        cap = torch.cuda.get_device_capability(q.device)
        if cap[0] < 9:
            raise ValueError(f"softcap_attention_hopper: needs an sm_90 (Hopper) GPU or newer, got sm_{cap[0]}{cap[1]}"
                             f" on {q.device}; use florenz_kernels.softcap_attention there")
        if q.dtype == torch.float32:
            raise ValueError("softcap_attention_hopper: fp32 q/k/v have no Hopper configs on the GPU (exact fp32 "
                             "dots spill at every tile); use florenz_kernels.softcap_attention for fp32")
        if _d_class(q.shape[-1]) not in CONFIGS["fwd"]:
            raise ValueError(f"softcap_attention_hopper: head dim {q.shape[-1]} has no Hopper configs on the GPU "
                             f"(head dims {sorted(CONFIGS['fwd'])} classes); use florenz_kernels.softcap_attention")


def _flags(g, causal, window, kpm, softcap, dtype, use_tma):
    return dict(IS_VARLEN=g.varlen, IS_CAUSAL=bool(causal), HAS_WINDOW=bool(window), HAS_KPM=kpm is not None,
                SOFTCAP=bool(softcap), TANH=_tanh_mode(dtype, gpu=not INTERPRET), HEAD_DIM=g.D, BLOCK_D=g.block_d,
                DOT_PREC=_dot_prec(dtype), USE_TMA=use_tma)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t, or a dense copy when only its base address or its strides break TMA's rule and the copy meets it."""
    if tma_ok(t):
        return t
    c = t.clone() if t.is_contiguous() else t.contiguous()
    return c if tma_ok(c) else t


def _plan_tma(use_tma: bool, head_dim: int, inputs: tuple, make_outputs):
    """(inputs, outputs, use TMA): TMA wherever its 16-byte rule can hold, with dense copies of the inputs that
    break it only through their base or strides (the outputs are allocated after, like the inputs). On the GPU the
    head-dim-256 class runs TMA only: its pointer-load variant spills (96 B at (16, 64, 8, 2), static report), so
    a call that cannot take TMA there (use_tma=False, or head dims that are not a multiple of 16 bytes) is refused
    with a ValueError; the smaller classes' pointer variants are spill-free and run."""
    if use_tma:
        inputs = tuple(_aligned(t) for t in inputs)
    outputs = make_outputs(*inputs)
    tma = bool(use_tma) and tma_ok(*inputs, *outputs)
    if not tma and not INTERPRET and _d_class(head_dim) == 256:
        raise ValueError(f"softcap_attention_hopper: head dim {head_dim} needs the TMA loads on the GPU (rows of "
                         f"16-byte multiples, use_tma=True); its pointer-load variant spills registers: use "
                         f"florenz_kernels.softcap_attention for this call")
    return inputs, outputs, tma


def _forward(q, k, v, cu_q, cu_k, kpm, max_q, max_k, scale, softcap, causal, window, use_tma):
    q, k, v = _prep(q), _prep(k), _prep(v)
    g = _Geometry(q, k, cu_q, max_q, max_k)
    lse, (slb, slh) = g.lse_empty(q)
    if q.numel() == 0:
        return torch.empty_like(q), lse.fill_(float("-inf"))
    (q, k, v), (out,), tma = _plan_tma(use_tma, g.D, (q, k, v), lambda q, k, v: (torch.empty_like(q),))
    if not INTERPRET:
        _ensure_allocator()
    kpm_t, s_kpm = _kpm_arg(kpm, q)
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    flags = _flags(g, causal, window, kpm, softcap, q.dtype, tma)
    s_scale, tanh_in, s_cap = _hscalars(scale, softcap, q.dtype, flags["TANH"])
    grid = lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)
    _fwd[grid](q, k, v, out, lse, cq, ck, kpm_t, *g.strides(q), *g.strides(k), *g.strides(v), *g.strides(out),
               slb, slh, s_kpm, g.L, g.S, g.H, g.groups, int(window or 0), s_scale, tanh_in, s_cap, _bucket(g.L),
               **flags)
    return out, lse


def _backward(do, q, k, v, out, lse, dlse, cu_q, cu_k, kpm, max_q, max_k, scale, softcap, causal, window, use_tma,
              deterministic):
    q, k, v, out, do = _prep(q), _prep(k), _prep(v), _prep(out), _prep(do)
    g = _Geometry(q, k, cu_q, max_q, max_k)
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse = lse.contiguous()
    slb, slh = g.lse_strides(lse)
    delta = torch.empty_like(lse)
    cq = cu_q if cu_q is not None else q
    ck = cu_k if cu_k is not None else q
    _pre[lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)](
        out, do, delta, cq, *g.strides(out), *g.strides(do), slb, slh, g.L, g.H,
        IS_VARLEN=g.varlen, HEAD_DIM=g.D, BLOCK_D=g.block_d, STRIDE_ALIGN=1)  # element strides (_units)
    if dlse is not None:  # d lse_i / d s_ij = P_ij folds into delta, as in the default path
        delta = delta - dlse.to(torch.float32)
    (q, k, v, do), (dk, dv), tma = _plan_tma(use_tma, g.D, (q, k, v, do),
                                             lambda q, k, v, do: (torch.empty_like(k), torch.empty_like(v)))
    if not INTERPRET:
        _ensure_allocator()
    kpm_t, s_kpm = _kpm_arg(kpm, q)
    flags = _flags(g, causal, window, kpm, softcap, q.dtype, tma)
    s_scale, tanh_in, s_cap = _hscalars(scale, softcap, q.dtype, flags["TANH"])
    # dQ accumulates in fp32 across the key blocks (atomics); D % 4 == 0 keeps its rows 16-byte aligned for TMA
    dqa = q if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dq_tma = tma and not deterministic and not INTERPRET and g.D % 4 == 0
    _bwd[lambda meta: (triton.cdiv(g.S, meta["BLOCK_N"]), g.B * g.Hk)](
        q, k, v, do, lse, delta, dk, dv, dqa, cq, ck, kpm_t, *g.strides(q), *g.strides(k), *g.strides(v),
        *g.strides(do), *g.strides(dk), *g.strides(dv), *g.strides(dqa), slb, slh, s_kpm, g.L, g.S, g.Hk, g.groups,
        int(window or 0), scale, s_scale, tanh_in, s_cap, _bucket(g.S), COMPUTE_DQ=not deterministic,
        DQ_TMA=dq_tma, **flags)
    dq = torch.empty_like(q)
    if deterministic:  # the default path's dQ kernel: one program per query block, a fixed summation order
        sl2, soc, cl2 = _scalars(scale, softcap, q.dtype)
        dflags = dict(IS_VARLEN=g.varlen, IS_CAUSAL=bool(causal), HAS_WINDOW=bool(window), HAS_KPM=kpm is not None,
                      SOFTCAP=bool(softcap), FAST_TANH=_fast_tanh(q.dtype), HEAD_DIM=g.D, BLOCK_D=g.block_d,
                      DOT_PREC=_dot_prec(q.dtype), STRIDE_ALIGN=1)
        _dq[lambda meta: (triton.cdiv(g.L, meta["BLOCK_M"]), g.B * g.H)](
            q, k, v, do, lse, delta, dq, cq, ck, kpm_t, *g.strides(q), *g.strides(k), *g.strides(v),
            *g.strides(do), *g.strides(dq), slb, slh, s_kpm, g.L, g.S, g.H, g.groups, int(window or 0), scale,
            sl2, soc, cl2, _bucket(g.L), **dflags)
    else:
        dq.copy_(dqa)
    return dq, dk, dv


# ---- torch.library ops -----------------------------------------------------------------------------------


@torch.library.custom_op("florenz::softcap_attention_hopper_fwd", mutates_args=())
def softcap_attention_hopper_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                                 key_padding_mask: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                                 scale: float, softcap: float, causal: bool, window: int, use_tma: bool,
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check_device(q)
    return _forward(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k, scale,
                    softcap, causal, window, use_tma)


@softcap_attention_hopper_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k, scale, softcap, causal,
      window, use_tma, deterministic):
    out = torch.empty_like(q)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("florenz::softcap_attention_hopper_bwd", mutates_args=())
def softcap_attention_hopper_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                                 cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                                 key_padding_mask: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int,
                                 scale: float, softcap: float, causal: bool, window: int, use_tma: bool,
                                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_device(q)
    return _backward(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q,
                     max_seqlen_k, scale, softcap, causal, window, use_tma, deterministic)


@softcap_attention_hopper_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, key_padding_mask, max_seqlen_q, max_seqlen_k,
      scale, softcap, causal, window, use_tma, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, kpm, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, kpm)
    ctx.args = tuple(rest)


def _backward_formula(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, kpm = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = softcap_attention_hopper_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, kpm, *ctx.args)
    return (dq, dk, dv) + (None,) * 11


softcap_attention_hopper_fwd.register_autograd(_backward_formula, setup_context=_setup_context)


# ---- public API ------------------------------------------------------------------------------------------


def softcap_attention_hopper(q, k, v, *, softcap: float = 0.0, scale: float | None = None, causal: bool = True,
                             window: int | None = None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                             max_seqlen_k=None, key_padding_mask=None, deterministic: bool = False,
                             use_tma: bool = True):
    """florenz_kernels.softcap_attention on the Hopper path (sm_90+, or the Triton interpreter): the same arguments,
    shapes, masks and return values (out, lse), both differentiable. Two more:

      deterministic: False (default): dQ is summed by fp32 atomics from the one dK/dV kernel (the order of the sums,
        so dQ's last bits, may differ between runs). True: dQ comes from a separate dQ pass (the default path's
        kernel): bitwise reproducible, one more Q.K^T recompute.
      use_tma: True (default): TMA tensor-descriptor loads; inputs whose base address or strides break TMA's
        16-byte rule are copied dense first, and head dims whose rows are not 16-byte multiples (fp16/bf16 D % 8)
        take the masked pointer loads. False: always the pointer loads. On the GPU the head-dim class 256 (D > 128)
        has no spill-free pointer variant: there a call that cannot take TMA raises a ValueError.

    Opt-in: the model and florenz_fast.ops keep florenz_kernels.softcap_attention until a GPU measurement shows this
    path faster (bench/bench_attention.py --hopper). Ops: `florenz::softcap_attention_hopper_fwd` / `_bwd`.
    """
    check_attention_inputs(q, k, v, causal=causal, window=window, key_padding_mask=key_padding_mask,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, name="softcap_attention_hopper",
                           check_values=False)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"softcap_attention_hopper: q, k, v must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"softcap_attention_hopper: head dim {q.shape[-1]} must be <= {MAX_HEAD_DIM}")
    if window is not None and window < 0:
        raise ValueError(f"softcap_attention_hopper: window must be >= 0, got {window}")
    if cu_seqlens_q is not None:
        cu_seqlens_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32).contiguous()
        cu_seqlens_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32).contiguous()
        if max_seqlen_q is None:  # a host sync, as in the default path: pass them when compiling / training
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if cu_seqlens_q.numel() > 1 else 0
        if max_seqlen_k is None:
            max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if cu_seqlens_k.numel() > 1 else 0
    else:
        max_seqlen_q, max_seqlen_k = q.shape[2], k.shape[2]
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return softcap_attention_hopper_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, key_padding_mask, int(max_seqlen_q),
                                        int(max_seqlen_k), float(scale), float(softcap or 0.0), bool(causal),
                                        int(window or 0), bool(use_tma), bool(deterministic))


# ---- static checks (no GPU): compile one config for sm_90 here, read registers / spills / shared / HGMMA ------

_KERNELS = {"fwd": "_hopper_fwd_kernel", "bwd": "_hopper_bwd_kernel"}
_FLOAT_ARGS = {"scale", "s_scale", "tanh_in", "s_cap"}
_F32_PTRS = {"LSE", "DELTA", "DQA"}
_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQA", "LSE", "DELTA", "CU_Q", "CU_K", "KPM"}


def static_resource_report_hopper(kind: str, head_dim: int, dtype: torch.dtype, config: HopperConfig, *,
                                  capability=(9, 0), varlen=False, causal=True, window=True, kpm=False,
                                  softcap=True, use_tma=True, compute_dq=True, dq_tma=True) -> dict:
    """Compile one config of the forward ("fwd") or the backward ("bwd") for `capability` on this GPU-less machine
    and read the cubin (florenz_kernels._static.compile_report). Needs TRITON_INTERPRET unset at import."""
    from ._static import compile_report

    fn = globals()[_KERNELS[kind]]
    ty = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    const = dict(IS_VARLEN=varlen, IS_CAUSAL=causal, HAS_WINDOW=window, HAS_KPM=kpm, SOFTCAP=softcap,
                 TANH=_tanh_mode(dtype, gpu=True), HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
                 DOT_PREC=_dot_prec(dtype), USE_TMA=use_tma, BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    if kind == "bwd":
        const.update(COMPUTE_DQ=compute_dq, DQ_TMA=dq_tma and compute_dq)

    def arg_type(name):
        if name in _PTRS:
            return "*fp32" if name in _F32_PTRS else "*i32" if name.startswith("CU_") else "*u8" if name == "KPM" \
                else "*" + ty
        return "fp32" if name in _FLOAT_ARGS else "i32"

    def aligned(name):
        return name in _PTRS or (name.startswith("stride_") and not name.startswith("stride_l")
                                 and name != "stride_kpmb")

    report = compile_report(fn, const, arg_type, aligned, capability, num_warps=config.num_warps,
                            num_stages=config.num_stages)
    report.update(kind=kind, head_dim=head_dim, dtype=ty, config=config)
    return report
