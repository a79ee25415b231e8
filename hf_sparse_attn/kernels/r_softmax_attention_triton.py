"""Flash-style r-softmax attention in Triton: forward and backward, never materialising the [T, S] scores.

Reference twin: ``hf_sparse_attn.ops.r_softmax(q @ k^T * scaling, rate, mask=valid) @ v`` (DESIGN §2 has the
maths, :mod:`hf_sparse_attn.ops.r_softmax` is the specification, ``docs/kernels.md`` has the design notes). Per
query row ``i`` with ``k`` valid keys, scores ``x_j = scaling q_i·k_j``, ``m`` their maximum and ``q_r`` their
r-quantile (linear interpolation between the order statistics at ranks ``floor(r (k-1))`` and ``ceil(r (k-1))``)::

    t = (m - q_r) + eps,   u_j = (x_j - m) + t,   a_j = relu(u_j) exp(x_j - m),   o_i = sum_j a_j v_j / sum_j a_j

Forward, per block of query rows (one program), streaming key blocks several times:

1. stats pass: row max ``m`` (and its first index), row min, valid count ``k``;
2. search passes: the exact order statistics by a safeguarded search on the value range. Each pass counts
   ``c = #{x <= tau}`` and finds ``max{x <= tau}`` and ``min{x > tau}``, which shrink a bracket of data
   values ``[v_lo, v_hi]`` with known ranks (``x_(c_lo) = v_lo``, ``x_(c_hi - 1) = v_hi``) until both ranks are
   pinned. Pivots: interpolation on the counts, a bisection step after any step that did not halve the count
   window, and after ``VALUE_ITERS`` passes bisection on the order-preserving integer image of the floats (at
   most 32 more), so the result is exact for any input;
3. output pass: ``m`` is final after pass 1, so the weighted sum needs no running-max rescaling; weights are
   divided by ``t`` so that they lie in [0, 1] (fp16-safe); key blocks without a surviving entry skip ``P V``.

Backward (FlashAttention-2 layout, scores recomputed blockwise), with ``g_j = dO_i·v_j``, ``c_j = 1[u_j > 0]``,
``e_j = exp(x_j - m)``, ``Z = sum_j a_j``, ``delta_i = <g, p> = dO_i·O_i`` and the argmax ``M``::

    dx_j = (c_j + relu(u_j)) e_j (g_j - delta) / Z - 1[j = M] rho,   rho = sum_j c_j e_j (g_j - delta) / Z

A row-parallel kernel computes ``dq``, ``delta`` and ``rho`` (the argmax share of ``dq`` is added at the end, with
one gathered key row); a key-parallel kernel then computes ``dk`` and ``dv`` with ``rho`` known. Both drop the
argmax column's own ``c_M e_M`` from ``b_M`` and from ``rho``, where the two cancel exactly (see ``_bwd_tile``).
Forward saves per row ``m``, ``t``, ``Z`` and the argmax index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["RSoftmaxAttentionFunction", "r_softmax_attention_bwd", "r_softmax_attention_fwd"]

#: search passes on the value range before switching to bisection on the float bit patterns (exactness bound)
VALUE_ITERS = 32
#: hard cap on search passes; VALUE_ITERS + 33 always suffices, so it is never reached
MAX_ITERS = VALUE_ITERS + 40


# fmt: off  (kernel signatures group their strides by tensor)
@triton.jit
def _float_key(x):
    """Order-preserving int32 image of float32 ``x``."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_float(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bfloat16 wrongly; bf16 products are exact in fp32 anyway
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _rows(X, o_r, n, stride, HEAD_DIM: tl.constexpr):
    """Rows ``o_r`` of an ``[n, D]`` matrix with row stride ``stride`` (zeros past ``n``)."""
    o_d = tl.arange(0, HEAD_DIM)
    return tl.load(X + o_r[:, None].to(tl.int64) * stride + o_d[None, :], mask=(o_r < n)[:, None], other=0.0)


@triton.jit
def _store_rows(X, o_r, n, stride, b_x, HEAD_DIM: tl.constexpr):
    """Store ``b_x`` into rows ``o_r < n`` of an ``[n, D]`` matrix, cast to its dtype."""
    o_d = tl.arange(0, HEAD_DIM)
    tl.store(X + o_r[:, None].to(tl.int64) * stride + o_d[None, :], b_x.to(X.dtype.element_ty), mask=(o_r < n)[:, None])


@triton.jit
def _key_mask(PAD, o_n, S, stride_pn, HAS_PAD: tl.constexpr):
    """Keys ``o_n`` that exist and are not padding, ``[BLOCK_N]``."""
    m_n = o_n < S
    if HAS_PAD:
        m_n = m_n & (tl.load(PAD + o_n.to(tl.int64) * stride_pn, mask=m_n, other=0) != 0)
    return m_n


@triton.jit
def _tile_scores(
    b_q,
    b_k,
    m_key,
    o_m,
    o_n,
    T,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Scores ``scale q k^T`` ``[BLOCK_M, BLOCK_N]`` (fp32) of query rows ``o_m`` against keys ``o_n``, and validity:
    the row exists, the key is valid, and under ``CAUSAL`` key ``j`` is at most ``i + offset``."""
    b_s = _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST) * scale
    m_valid = (o_m < T)[:, None] & m_key[None, :]
    if CAUSAL:
        m_valid = m_valid & (o_n[None, :] <= o_m[:, None] + offset)
    return b_s, m_valid


@triton.jit
def _ranks_known(lo, hi, c_lo, c_hi, v_lo, v_hi):
    """Whether the bracket pins both order statistics: rank c_lo holds v_lo, rank c_hi - 1 holds v_hi, and every
    rank between holds a value in [v_lo, v_hi]."""
    same = v_lo == v_hi
    return ((lo == c_lo) | (lo == c_hi - 1) | same) & ((hi == c_lo) | (hi == c_hi - 1) | same)


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    PAD,
    RATE,
    OUT,
    STAT_M,
    STAT_T,
    STAT_Z,
    STAT_ARG,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_pb,
    stride_pn,
    H,
    T,
    S,
    offset,
    scale,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    VALUE_ITERS: tl.constexpr,
    MAX_ITERS: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    OUT += i_b * stride_ob + i_h * stride_oh
    PAD += i_b * stride_pb
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
    n_end = S
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(S, (i_m + 1) * BLOCK_M + offset), 0)

    # 1. stats: row max (first index, as torch.max), row min, valid count k
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_min = tl.full([BLOCK_M], float("inf"), tl.float32)
    b_arg = tl.zeros([BLOCK_M], tl.int32)
    b_cnt = tl.zeros([BLOCK_M], tl.int32)
    for i_n in range(0, n_end, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
        m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
        b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
        b_top = tl.where(m_valid, b_s, float("-inf"))
        b_tile_max = tl.max(b_top, 1)
        m_new = b_tile_max > b_max
        b_arg = tl.where(m_new, tl.argmax(b_top, 1).to(tl.int32) + i_n, b_arg)
        b_max = tl.where(m_new, b_tile_max, b_max)
        b_min = tl.minimum(b_min, tl.min(tl.where(m_valid, b_s, float("inf")), 1))
        b_cnt += tl.sum(m_valid.to(tl.int32), 1)

    # 2. the order statistics at ranks lo = floor(r (k-1)) and hi = ceil(r (k-1)), exactly
    b_pos = tl.load(RATE + i_h) * tl.maximum(b_cnt - 1, 0).to(tl.float32)
    b_lo = tl.floor(b_pos).to(tl.int32)
    b_hi = tl.ceil(b_pos).to(tl.int32)
    b_frac = b_pos - b_lo.to(tl.float32)
    m_empty = b_cnt == 0
    # bracket of data values with known ranks: rank c_lo holds v_lo, rank c_hi - 1 holds v_hi
    v_lo, c_lo = tl.where(m_empty, 0.0, b_min), tl.zeros([BLOCK_M], tl.int32)
    v_hi, c_hi = tl.where(m_empty, 0.0, b_max), b_cnt
    m_done = m_empty | _ranks_known(b_lo, b_hi, c_lo, c_hi, v_lo, v_hi)
    m_bisect = tl.zeros([BLOCK_M], tl.int1)  # the last step did not halve the count window: bisect next
    n_iter = 0
    todo = tl.max(tl.where(m_done, 0, 1), 0)
    while todo > 0:
        # pivot: interpolate the counts linearly between the bracket ends (or bisect), kept in [v_lo, v_hi)
        width = c_hi - c_lo
        f = (b_lo.to(tl.float32) + 0.5 - c_lo.to(tl.float32)) / tl.maximum(width - 1, 1).to(tl.float32)
        f = tl.where(m_bisect, 0.5, tl.minimum(tl.maximum(f, 0.0), 1.0))
        tau = v_lo + (v_hi - v_lo) * f
        if n_iter >= VALUE_ITERS:  # bisect the bit patterns: at most 32 more passes, whatever the values
            k_lo, k_hi = _float_key(v_lo), _float_key(v_hi)
            tau = _key_float((k_lo >> 1) + (k_hi >> 1) + (k_lo & k_hi & 1))
        tau = tl.where((tau >= v_lo) & (tau < v_hi), tau, v_lo)
        # c = #{x <= tau}, the largest score <= tau and the smallest > tau
        b_c = tl.zeros([BLOCK_M], tl.int32)
        b_below = tl.full([BLOCK_M], float("-inf"), tl.float32)
        b_above = tl.full([BLOCK_M], float("inf"), tl.float32)
        for i_n in range(0, n_end, BLOCK_N):
            o_n = i_n + tl.arange(0, BLOCK_N)
            b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
            m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
            b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
            m_le = m_valid & (b_s <= tau[:, None])
            b_c += tl.sum(m_le.to(tl.int32), 1)
            b_below = tl.maximum(b_below, tl.max(tl.where(m_le, b_s, float("-inf")), 1))
            b_above = tl.minimum(b_above, tl.min(tl.where(m_valid & ~m_le, b_s, float("inf")), 1))
        m_low = ~m_done & (b_c <= b_lo)  # x_(lo) > tau
        m_high = ~m_done & (b_c > b_hi)  # x_(hi) <= tau
        m_hit = ~m_done & ~m_low & ~m_high  # c = lo + 1 = hi: tau lies between the two
        v_lo = tl.where(m_low, b_above, tl.where(m_hit, b_below, v_lo))
        c_lo = tl.where(m_low, b_c, tl.where(m_hit, b_lo, c_lo))
        v_hi = tl.where(m_high, b_below, tl.where(m_hit, b_above, v_hi))
        c_hi = tl.where(m_high, b_c, tl.where(m_hit, b_hi + 1, c_hi))
        m_bisect = ~m_bisect & (2 * (c_hi - c_lo) > width)
        m_done = m_done | _ranks_known(b_lo, b_hi, c_lo, c_hi, v_lo, v_hi)
        n_iter += 1
        todo = tl.where(n_iter < MAX_ITERS, tl.max(tl.where(m_done, 0, 1), 0), 0)
    x_lo = tl.where(b_lo == c_lo, v_lo, v_hi)
    x_hi = tl.where(b_hi == c_hi - 1, v_hi, v_lo)
    # torch.lerp's formula, so that the quantile matches torch.quantile's
    b_quantile = tl.where(b_frac < 0.5, x_lo + b_frac * (x_hi - x_lo), x_hi - (x_hi - x_lo) * (1.0 - b_frac))
    b_max = tl.where(m_empty, 0.0, b_max)
    b_t = tl.where(m_empty, eps, (b_max - b_quantile) + eps)

    # 3. output o = sum_j a_j v_j / sum_j a_j, with a_j / t in [0, 1] (the argmax has a = t): safe in fp16
    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    b_z = tl.zeros([BLOCK_M], tl.float32)
    for i_n in range(0, n_end, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
        m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
        b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
        b_shift = b_s - b_max[:, None]
        b_u = b_shift + b_t[:, None]
        m_alive = m_valid & (b_u > 0)
        if tl.max(m_alive.to(tl.int32)) > 0:  # skip P V for blocks below every row's threshold
            b_a = tl.where(m_alive, (b_u / b_t[:, None]) * tl.exp(tl.where(m_alive, b_shift, 0.0)), 0.0)
            b_v = _rows(V, o_n, S, stride_vn, HEAD_DIM)
            b_acc += _dot(b_a.to(b_v.dtype), b_v, DOT_PRECISION, UPCAST)
            b_z += tl.sum(b_a, 1)
    b_o = b_acc / tl.where(b_z > 0, b_z, 1.0)[:, None]  # a row without valid keys gives 0
    _store_rows(OUT, o_m, T, stride_ot, b_o, HEAD_DIM)
    o_stat = i_bh.to(tl.int64) * T + o_m
    tl.store(STAT_M + o_stat, b_max, mask=m_m)
    tl.store(STAT_T + o_stat, b_t, mask=m_m)
    tl.store(STAT_Z + o_stat, tl.where(b_z > 0, b_z * b_t, 1.0), mask=m_m)
    tl.store(STAT_ARG + o_stat, b_arg, mask=m_m)


@triton.jit
def _bwd_tile(
    b_q,
    b_do,
    b_k,
    b_v,
    m_key,
    o_m,
    o_n,
    b_max,
    b_t,
    b_z,
    b_delta,
    b_arg,
    T,
    offset,
    scale,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of the backward: ``(any alive, p, ds, rho terms)``.

    ``ds`` is ``dx`` without the argmax correction ``-rho``. The argmax column's own share ``c_M e_M = 1`` of
    ``b_M`` cancels exactly against its term in ``rho``, so both drop it: ``b_M -> w_M e_M`` and
    ``rho = sum_{j != M} c_j e_j (g_j - delta) / Z``. Otherwise a row with a tiny margin (``Z ~ t ~ eps``) would
    subtract two numbers of size ``1 / eps`` after ``ds`` was rounded to the input dtype. ``g = dO V^T`` is only
    computed when some entry of the tile survives the threshold."""
    b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
    b_shift = b_s - b_max[:, None]
    b_u = b_shift + b_t[:, None]
    m_alive = m_valid & (b_u > 0)
    b_e = tl.where(m_alive, tl.exp(tl.where(m_alive, b_shift, 0.0)), 0.0)
    b_we = b_e * tl.maximum(b_u, 0.0)
    b_ce = tl.where(o_n[None, :] == b_arg[:, None], 0.0, b_e)  # c e off the argmax
    any_alive = tl.max(m_alive.to(tl.int32)) > 0
    b_ds = tl.zeros_like(b_e)
    b_rho = tl.zeros_like(b_e)
    if any_alive:
        b_centred = (_dot(b_do, tl.trans(b_v), DOT_PRECISION, UPCAST) - b_delta[:, None]) / b_z[:, None]
        b_ds = (b_ce + b_we) * b_centred
        b_rho = b_ce * b_centred
    return any_alive, b_we / b_z[:, None], b_ds, b_rho


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    PAD,
    OUT,
    DO,
    DQ,
    STAT_M,
    STAT_T,
    STAT_Z,
    STAT_ARG,
    STAT_DELTA,
    STAT_RHO,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_pb,
    stride_pn,
    H,
    T,
    S,
    offset,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    OUT += i_b * stride_ob + i_h * stride_oh
    DO += i_b * stride_dob + i_h * stride_doh
    DQ += i_b * stride_dqb + i_h * stride_dqh
    PAD += i_b * stride_pb
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
    b_do = _rows(DO, o_m, T, stride_dot, HEAD_DIM)
    b_delta = tl.sum(b_do.to(tl.float32) * _rows(OUT, o_m, T, stride_ot, HEAD_DIM).to(tl.float32), 1)  # <g, p>
    o_stat = i_bh.to(tl.int64) * T + o_m
    b_max = tl.load(STAT_M + o_stat, mask=m_m, other=0.0)
    b_t = tl.load(STAT_T + o_stat, mask=m_m, other=0.0)
    b_z = tl.load(STAT_Z + o_stat, mask=m_m, other=1.0)
    b_arg = tl.load(STAT_ARG + o_stat, mask=m_m, other=0)
    n_end = S
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(S, (i_m + 1) * BLOCK_M + offset), 0)

    b_dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    b_rho = tl.zeros([BLOCK_M], tl.float32)
    for i_n in range(0, n_end, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
        b_v = _rows(V, o_n, S, stride_vn, HEAD_DIM)
        m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
        any_alive, b_p, b_ds, b_rho_terms = _bwd_tile(
            b_q,
            b_do,
            b_k,
            b_v,
            m_key,
            o_m,
            o_n,
            b_max,
            b_t,
            b_z,
            b_delta,
            b_arg,
            T,
            offset,
            scale,
            CAUSAL,
            DOT_PRECISION,
            UPCAST,
        )
        if any_alive:
            b_rho += tl.sum(b_rho_terms, 1)
            b_dq += _dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, UPCAST)
    # the threshold moves with the maximum: dx_M -= rho, i.e. dq -= rho k_M
    b_dq -= b_rho[:, None] * _rows(K, tl.where(m_m, b_arg, S), S, stride_kn, HEAD_DIM).to(tl.float32)
    _store_rows(DQ, o_m, T, stride_dqt, b_dq * scale, HEAD_DIM)
    tl.store(STAT_DELTA + o_stat, b_delta, mask=m_m)
    tl.store(STAT_RHO + o_stat, b_rho, mask=m_m)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    PAD,
    DO,
    DK,
    DV,
    STAT_M,
    STAT_T,
    STAT_Z,
    STAT_ARG,
    STAT_DELTA,
    STAT_RHO,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_pb,
    stride_pn,
    H,
    T,
    S,
    offset,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    DO += i_b * stride_dob + i_h * stride_doh
    DK += i_b * stride_dkb + i_h * stride_dkh
    DV += i_b * stride_dvb + i_h * stride_dvh
    PAD += i_b * stride_pb
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
    b_v = _rows(V, o_n, S, stride_vn, HEAD_DIM)
    m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
    m_start = 0
    if CAUSAL:  # query i sees key j iff j <= i + offset
        m_start = tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M

    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for i_m in range(m_start, T, BLOCK_M):
        o_m = i_m + tl.arange(0, BLOCK_M)
        m_m = o_m < T
        o_stat = i_bh.to(tl.int64) * T + o_m
        b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
        b_do = _rows(DO, o_m, T, stride_dot, HEAD_DIM)
        b_max = tl.load(STAT_M + o_stat, mask=m_m, other=0.0)
        b_t = tl.load(STAT_T + o_stat, mask=m_m, other=0.0)
        b_z = tl.load(STAT_Z + o_stat, mask=m_m, other=1.0)
        b_delta = tl.load(STAT_DELTA + o_stat, mask=m_m, other=0.0)
        b_arg = tl.load(STAT_ARG + o_stat, mask=m_m, other=-1)
        any_alive, b_p, b_ds, b_rho_terms = _bwd_tile(
            b_q,
            b_do,
            b_k,
            b_v,
            m_key,
            o_m,
            o_n,
            b_max,
            b_t,
            b_z,
            b_delta,
            b_arg,
            T,
            offset,
            scale,
            CAUSAL,
            DOT_PRECISION,
            UPCAST,
        )
        if any_alive:
            b_rho = tl.load(STAT_RHO + o_stat, mask=m_m, other=0.0)
            b_ds -= tl.where(o_n[None, :] == b_arg[:, None], b_rho[:, None], 0.0)
            b_dv += _dot(tl.trans(b_p.to(b_do.dtype)), b_do, DOT_PRECISION, UPCAST)
            b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, DOT_PRECISION, UPCAST)
    _store_rows(DK, o_n, S, stride_dkn, b_dk * scale, HEAD_DIM)
    _store_rows(DV, o_n, S, stride_dvn, b_dv, HEAD_DIM)


# fmt: on


def _launch_config(q: torch.Tensor, block_m: int | None, block_n: int | None) -> dict:
    """Block sizes and compile options: untuned GPU defaults (see docs/kernels.md); 64 x 64 on the interpreter,
    whose cost grows with the number of operations rather than their size."""
    head_dim = q.shape[-1]
    interpret = not q.is_cuda
    config = {
        "BLOCK_M": block_m or 64,
        "BLOCK_N": block_n or (64 if interpret or head_dim <= 64 else 32),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": interpret and q.dtype == torch.bfloat16,
    }
    if not interpret:
        config.update(num_warps=4, num_stages=2)
    return config


def _padding_args(key_padding: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The padding pointer and its (batch, key) strides; a dummy when every key is valid."""
    if key_padding is None:
        return q, 0, 0  # never read: HAS_PAD is False
    return key_padding, key_padding.stride(0), key_padding.stride(1)


def r_softmax_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding: torch.Tensor | None,
    rate: torch.Tensor,
    causal: bool,
    scale: float,
    eps: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Launch the forward kernel.

    Args:
        q: ``[B, H, T, D]``; k, v: ``[B, H, S, D]``, same dtype (fp16/bf16/fp32), last dim contiguous.
        key_padding: bool ``[B, S]`` (True = valid key; may be a stride-0 broadcast) or None.
        rate: fp32 ``[H]`` on the device.
        causal: query ``i`` sees key ``j`` iff ``j <= i + S - T`` (queries aligned to the end, as under a KV cache).

    Returns:
        ``(o [B, T, H, D], (m, t, z, argmax))`` with per-row stats ``[B, H, T]`` saved for the backward.
    """
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    out = torch.empty(batch, t_len, heads, head_dim, dtype=q.dtype, device=q.device)  # (B, T, H, D)
    stats = tuple(torch.empty(batch, heads, t_len, dtype=torch.float32, device=q.device) for _ in range(3))
    argmax = torch.empty(batch, heads, t_len, dtype=torch.int32, device=q.device)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    config = _launch_config(q, block_m, block_n)
    grid = (triton.cdiv(t_len, config["BLOCK_M"]), batch * heads)
    _fwd_kernel[grid](
        q, k, v, pad, rate, out, *stats, argmax,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, eps,
        HEAD_DIM=head_dim, CAUSAL=causal, HAS_PAD=key_padding is not None,
        VALUE_ITERS=VALUE_ITERS, MAX_ITERS=MAX_ITERS, **config,
    )  # fmt: skip
    return out, (*stats, argmax)


def r_softmax_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    key_padding: torch.Tensor | None,
    stats: tuple[torch.Tensor, ...],
    causal: bool,
    scale: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: ``do``/``out`` ``[B, T, H, D]``, the rest as in :func:`r_softmax_attention_fwd`.

    Returns ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``."""
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    stat_m, stat_t, stat_z, argmax = stats
    delta = torch.empty_like(stat_m)  # (B, H, T)
    rho = torch.empty_like(stat_m)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    config = _launch_config(q, block_m, block_n)
    common = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_PAD=key_padding is not None, **config)
    _bwd_dq_kernel[(triton.cdiv(t_len, config["BLOCK_M"]), batch * heads)](
        q, k, v, pad, out, do, dq, stat_m, stat_t, stat_z, argmax, delta, rho,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        do.stride(0), do.stride(2), do.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, **common,
    )  # fmt: skip
    _bwd_dkdv_kernel[(triton.cdiv(s_len, config["BLOCK_N"]), batch * heads)](
        q, k, v, pad, do, dk, dv, stat_m, stat_t, stat_z, argmax, delta, rho,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(2), do.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, **common,
    )  # fmt: skip
    return dq, dk, dv


class RSoftmaxAttentionFunction(torch.autograd.Function):
    """``RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, causal, scale, eps[, blocks]) -> o [B, T, H, D]``.

    Arguments as in :func:`r_softmax_attention_fwd`; ``blocks`` optionally fixes ``(BLOCK_M, BLOCK_N)`` (tests).
    Inputs are trusted: the dispatcher :func:`hf_sparse_attn.kernels.r_softmax_attention` validates them. Gradients
    flow to ``q``, ``k`` and ``v``; the rate gets none (the margin is detached, as in
    :class:`hf_sparse_attn.ops.RSoftmax`).
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding: torch.Tensor | None,
        rate: torch.Tensor,
        causal: bool,
        scale: float,
        eps: float,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        block_m, block_n = blocks or (None, None)
        out, stats = r_softmax_attention_fwd(q, k, v, key_padding, rate, causal, scale, eps, block_m, block_n)
        ctx.save_for_backward(q, k, v, out, key_padding, *stats)
        ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_m, block_n)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, key_padding, *stats = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = r_softmax_attention_bwd(
            do, q, k, v, out, key_padding, tuple(stats), ctx.causal, ctx.scale, *ctx.blocks
        )
        return dq, dk, dv, None, None, None, None, None, None
