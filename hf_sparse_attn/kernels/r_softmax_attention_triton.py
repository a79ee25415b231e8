"""Flash-style r-softmax attention in Triton: forward and backward, never materialising the [T, S] scores.

Reference twin: ``hf_sparse_attn.ops.r_softmax(q @ k^T * scaling, rate, mask=valid) @ v`` (DESIGN §2 has the
maths, :mod:`hf_sparse_attn.ops.r_softmax` is the specification, ``docs/kernels.md`` has the design notes). Per
query row ``i`` with ``k`` valid keys, scores ``x_j = scaling q_i·k_j``, ``m`` their maximum and ``q_r`` their
r-quantile (linear interpolation between the order statistics at ranks ``floor(r (k-1))`` and ``ceil(r (k-1))``)::

    t = (m - q_r) + eps,   u_j = (x_j - m) + t,   a_j = relu(u_j) exp(x_j - m),   o_i = sum_j a_j v_j / sum_j a_j

Forward, per block of query rows (one program per kernel):

1. :func:`~hf_sparse_attn.kernels.r_softmax_threshold_triton.r_softmax_threshold`: ``m`` and ``t`` exactly, in a
   few passes over the keys (a 16-bucket histogram search; about 4 passes, the first also finding ``m``), and a
   conservative live-tile bitmask (may a row of the row block keep a positive weight in the key block?);
2. ``_output_kernel``, one pass: ``m`` is final, so the weighted sum needs no running-max rescaling; weights are
   accumulated as ``a / t`` in [0, 1] (fp16-safe) with ``exp2`` and one reciprocal of ``t`` and of the sum per row;
   key tiles the bitmask marks dead cost one byte (no ``K``, no ``q k^T``); the argmax (first index of ``m``) is
   found here. Both kernels class the key tiles once per call, so key padding and causality cost a test only on
   tiles of mixed padding or crossing the diagonal. On CUDA both are autotuned (:mod:`~hf_sparse_attn.kernels.tuning`:
   the threshold kernel picks the tile, the output kernel its warps for that tile). Attention
   dropout, when asked for, scales the weights by ``keep / (1 - p)`` from a counter-based mask
   (:func:`dropout_keep_mask` draws the same one). A NaN score gives a NaN row.

Backward (FlashAttention-2 layout, scores recomputed blockwise), with ``g_j = dO_i·v_j``, ``c_j = 1[u_j > 0]``,
``e_j = exp(x_j - m)``, ``Z = sum_j a_j``, ``delta_i = <g, p> = dO_i·O_i`` and the argmax ``M``::

    dx_j = (c_j + relu(u_j)) e_j (g_j - delta) / Z - 1[j = M] rho,   rho = sum_j c_j e_j (g_j - delta) / Z

Three launches (:func:`r_softmax_attention_bwd`):

1. ``_bwd_preprocess_kernel``: ``delta = dO·O`` per row; zeroes the fp32 ``dq`` accumulator, ``rho`` and the
   ordering counters.
2. ``_bwd_kernel``, one program per key block streaming the query blocks, 5 GEMMs per live tile as
   FlashAttention-2: ``q kᵀ``, ``dO vᵀ``, ``(p d)ᵀ dO -> dv``, ``dsᵀ q -> dk``, ``ds k -> dq``. ``ds`` is ``dx``
   without ``-rho``; ``rho`` needs the whole row, so its partial sums travel with ``dq``'s into fp32 accumulators,
   in key-block order by default (deterministic: per row block a counter in global memory, key block ``n`` adds
   after ``n - 1`` did, as FlashAttention-3's deterministic mode; key blocks are the fastest grid axis and
   programs start in grid order, so the wait cannot deadlock; after the first wave, programs should start
   staggered in that order anyway, so waits stay short), or by atomic adds (``deterministic=False``). ``dv`` is
   final here; ``dk`` is missing only the argmax share.
3. ``_bwd_epilogue_kernel``, the argmax share in fp32, never rounded to the input dtype before it is added:
   ``dq_i -= rho_i k_M(i)`` (a gather of one key row per query row, fused with ``dq``'s cast, which an fp32
   accumulator needs anyway) and ``dk_M -= sum_{i: M(i) = M} rho_i q_i`` (per key block, a scan of the argmax
   of the rows that can see it and a one-hot fp32 GEMM only on row blocks that point into it). This is the cheap
   place: ``rho`` is complete only after every key block ran; a row-parallel scatter into ``dk`` would need
   atomics (nondeterministic) or sorting rows by argmax. ``dk`` waits in the input dtype (final in key blocks
   holding no argmax); the share is added in fp32 and rounded once (see ``_bwd_epilogue_kernel``).

Both ``ds`` and ``rho`` drop the argmax column's own ``c_M e_M``, where the two cancel exactly (see
``_bwd_tile``), and multiply by a per-row ``1 / Z``. With dropout, ``g_j`` carries the same mask. Forward saves
per row ``m``, ``t``, ``Z`` and the argmax index, and its live-tile bitmask, with which ``_bwd_kernel`` skips dead
tiles (when its tiles lie inside the forward's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import FunctionCtx, once_differentiable

from hf_sparse_attn.kernels import tuning
from hf_sparse_attn.kernels.r_softmax_threshold_triton import (
    TILE_DEAD,
    TILE_FULL,
    _dot,
    _key_mask,
    _padding_args,
    _rows,
    _store_rows,
    _tile_class,
    _valid_scores,
    kernel_options,
    launch_options,
    r_softmax_threshold,
)

__all__ = ["RSoftmaxAttentionFunction", "dropout_keep_mask", "r_softmax_attention_bwd", "r_softmax_attention_fwd"]

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e)


# fmt: off  (kernel signatures group their strides by tensor)
@triton.jit
def _dropout_scale(seed, i_bh, o_m, o_n, S, p_drop, DROPOUT: tl.constexpr):
    """``keep / (1 - p)`` per score ``[BLOCK_M, BLOCK_N]`` (1.0 without dropout): counter-based, so the forward,
    the backward and :func:`dropout_keep_mask` draw the same mask. Philox keyed by ``(seed, b * H + h)``, counter
    ``i * S + j``."""
    if DROPOUT:
        key = seed + (i_bh.to(tl.int64) << 32)
        keep = tl.rand(key, o_m[:, None] * S + o_n[None, :]) >= p_drop
        return tl.where(keep, 1.0 / (1.0 - p_drop), 0.0)
    return tl.full([o_m.shape[0], o_n.shape[0]], 1.0, tl.float32)


@triton.jit
def _output_kernel(
    Q,
    K,
    V,
    PAD,
    CLASS,
    LIVE,
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
    stride_cb,
    H,
    T,
    S,
    offset,
    scale,
    seed,
    p_drop,
    s_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CLASS_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """``o = sum_j a_j d_j v_j / sum_j a_j`` for the threshold of ``_threshold_kernel`` (``d`` = dropout scale),
    the normaliser ``Z`` and the argmax (first index of the max, as ``torch.max``), in one pass over the keys.

    ``m`` is final, so no running-max rescaling; the weights are accumulated as ``a_j / t`` in ``[0, 1]`` (the
    argmax has ``a = t``), fp16-safe, with one reciprocal of ``t`` and one of the sum per row and ``exp2``. A key
    tile the threshold kernel's bitmask ``LIVE`` marks dead costs one byte load: no ``K``, no ``q k^T``, no ``V``.
    The maximum's tile is always live (``u = t > 0`` there). Only tiles of mixed key padding load the padding, only
    tiles crossing the causal diagonal compare positions (``_valid_scores``). ``s_bucket`` is only the autotuning
    key."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    OUT += i_b * stride_ob + i_h * stride_oh
    PAD += i_b * stride_pb
    CLASS += i_b * stride_cb
    n_class = tl.cdiv(S, CLASS_BLOCK)
    LIVE += (i_bh.to(tl.int64) * tl.num_programs(0) + i_m) * tl.cdiv(S, BLOCK_N)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_stat = i_bh.to(tl.int64) * T + o_m
    b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
    b_max = tl.load(STAT_M + o_stat, mask=m_m, other=0.0)
    b_t = tl.load(STAT_T + o_stat, mask=m_m, other=1.0)
    b_inv_t = 1.0 / b_t
    n_end = S
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(S, (i_m + 1) * BLOCK_M + offset), 0)

    b_acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    b_z = tl.zeros([BLOCK_M], tl.float32)
    b_arg = tl.full([BLOCK_M], 2147483647, tl.int32)
    for i_n in range(0, n_end, BLOCK_N):
        if tl.load(LIVE + i_n // BLOCK_N) != 0:
            o_n = i_n + tl.arange(0, BLOCK_N)
            b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
            b_s = _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST) * scale
            key_class = _tile_class(CLASS, i_n, S, n_class, BLOCK_N, CLASS_BLOCK, HAS_PAD)
            b_s = _valid_scores(b_s, PAD, key_class, i_m, i_n, S, offset, stride_pn, BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD)
            b_shift = b_s - b_max[:, None]  # -inf at invalid entries
            b_u = b_shift + b_t[:, None]
            m_alive = b_u > 0
            b_arg = tl.minimum(b_arg, tl.min(tl.where(b_shift == 0.0, o_n[None, :], 2147483647), 1))
            b_a = tl.where(m_alive, (b_u * b_inv_t[:, None]) * tl.exp2(tl.where(m_alive, b_shift, 0.0) * LOG2E), 0.0)
            b_z += tl.sum(b_a, 1)
            b_v = _rows(V, o_n, S, stride_vn, HEAD_DIM)
            b_pd = b_a * _dropout_scale(seed, i_bh, o_m, o_n, S, p_drop, DROPOUT)
            b_acc += _dot(b_pd.to(b_v.dtype), b_v, DOT_PRECISION, UPCAST)
    b_inv_z = 1.0 / tl.where(b_z > 0, b_z, 1.0)  # a row without valid keys gives 0
    b_o = tl.where((b_max == b_max)[:, None], b_acc * b_inv_z[:, None], float("nan"))  # a NaN score: a NaN row
    _store_rows(OUT, o_m, T, stride_ot, b_o, HEAD_DIM)
    tl.store(STAT_Z + o_stat, tl.where(b_z > 0, b_z * b_t, 1.0), mask=m_m)
    tl.store(STAT_ARG + o_stat, tl.where(b_arg == 2147483647, 0, b_arg), mask=m_m)


@triton.jit
def _dropout_mask_kernel(KEEP, seed, p_drop, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``KEEP [B * H, T, S]`` (int8): the dropout mask the attention kernels draw."""
    i_m, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b_keep = _dropout_scale(seed, i_bh, o_m, o_n, S, p_drop, True) > 0
    o_keep = (i_bh.to(tl.int64) * T + o_m[:, None]) * S + o_n[None, :]
    tl.store(KEEP + o_keep, b_keep.to(tl.int8), mask=(o_m < T)[:, None] & (o_n < S)[None, :])


@triton.jit
def _bwd_tile(
    b_q,
    b_do,
    b_k,
    b_v,
    PAD,
    key_class,
    i_m,
    i_n,
    b_max,
    b_t,
    b_inv_z,
    b_delta,
    b_arg,
    i_bh,
    S,
    offset,
    scale,
    seed,
    p_drop,
    stride_pn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of the backward: ``(any alive, p d, ds, rho terms)``.

    With dropout (scale ``d_j = keep_j / (1 - p)``), the gradient reaching ``p_j`` is ``d_j g_j`` and ``dv`` takes
    ``p d``; ``delta = dO·O`` already includes ``d``.

    ``ds`` is ``dx`` without the argmax correction ``-rho``. The argmax column's own share ``c_M e_M = 1`` of
    ``b_M`` cancels exactly against its term in ``rho``, so both drop it: ``b_M -> w_M e_M`` and
    ``rho = sum_{j != M} c_j e_j (g_j - delta) / Z``. Otherwise a row with a tiny margin (``Z ~ t ~ eps``) would
    subtract two numbers of size ``1 / eps`` after ``ds`` was rounded to the input dtype. ``g = dO V^T`` is only
    computed when some entry of the tile survives the threshold.

    The tile is rows ``i_m * BLOCK_M + [0, BLOCK_M)``, keys ``i_n + [0, BLOCK_N)`` of class ``key_class``; invalid
    entries get the score ``-inf`` (``_valid_scores``: only on tiles of mixed key padding or crossing the causal
    diagonal), which never survives. Rows past ``T`` load ``q = 0``, ``m = t = 0``, so ``u = 0``: none survives."""
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n + tl.arange(0, BLOCK_N)
    b_s = _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST) * scale
    b_s = _valid_scores(b_s, PAD, key_class, i_m, i_n, S, offset, stride_pn, BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD)
    b_shift = b_s - b_max[:, None]
    b_u = b_shift + b_t[:, None]
    m_alive = b_u > 0
    b_e = tl.where(m_alive, tl.exp2(tl.where(m_alive, b_shift, 0.0) * LOG2E), 0.0)
    b_we = b_e * tl.maximum(b_u, 0.0)
    b_ce = tl.where(o_n[None, :] == b_arg[:, None], 0.0, b_e)  # c e off the argmax
    any_alive = tl.max(m_alive.to(tl.int32)) > 0
    b_d = _dropout_scale(seed, i_bh, o_m, o_n, S, p_drop, DROPOUT)
    b_ds = tl.zeros_like(b_e)
    b_rho = tl.zeros_like(b_e)
    if any_alive:
        b_g = _dot(b_do, tl.trans(b_v), DOT_PRECISION, UPCAST)
        if DROPOUT:
            b_g = b_g * b_d
        b_centred = (b_g - b_delta[:, None]) * b_inv_z[:, None]
        b_ds = (b_ce + b_we) * b_centred
        b_rho = b_ce * b_centred
    return any_alive, b_we * b_inv_z[:, None] * b_d, b_ds, b_rho


@triton.jit
def _bwd_live_tile(
    LIVE,
    i_bh,
    i_m,
    i_n,
    T,
    S,
    BLOCK_N: tl.constexpr,
    LIVE_M: tl.constexpr,
    LIVE_N: tl.constexpr,
    HAS_LIVE: tl.constexpr,
):
    """False where the forward's live-tile bitmask (``LIVE_M x LIVE_N`` tiles, each holding whole backward tiles)
    marks the tile at rows ``i_m``, key block ``i_n`` dead; True without a bitmask."""
    live = tl.full([], 1, tl.int1)
    if HAS_LIVE:
        o_live = (i_bh.to(tl.int64) * tl.cdiv(T, LIVE_M) + i_m // LIVE_M) * tl.cdiv(S, LIVE_N) + i_n * BLOCK_N // LIVE_N
        live = tl.load(LIVE + o_live) != 0
    return live


@triton.jit
def _bwd_preprocess_kernel(
    OUT,
    DO,
    DQ_ACC,
    STAT_DELTA,
    STAT_RHO,
    LOCKS,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    """Per row ``delta = dO·O`` (``= <g, p>``, FlashAttention's trick); zeroes the row's ``dq`` accumulator
    (fp32 ``[B·H, T, D]``), its ``rho`` and, in deterministic mode, the row block's ordering counter."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_stat = i_bh.to(tl.int64) * T + o_m
    b_do = _rows(DO + i_b * stride_dob + i_h * stride_doh, o_m, T, stride_dot, HEAD_DIM).to(tl.float32)
    b_o = _rows(OUT + i_b * stride_ob + i_h * stride_oh, o_m, T, stride_ot, HEAD_DIM).to(tl.float32)
    tl.store(STAT_DELTA + o_stat, tl.sum(b_do * b_o, 1), mask=m_m)
    tl.store(STAT_RHO + o_stat, tl.zeros([BLOCK_M], tl.float32), mask=m_m)
    _store_rows(DQ_ACC + i_bh.to(tl.int64) * T * HEAD_DIM, o_m, T, HEAD_DIM, tl.zeros_like(b_o), HEAD_DIM)
    if DETERMINISTIC:
        tl.store(LOCKS + i_bh * tl.num_programs(0) + i_m, 0)


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    PAD,
    DO,
    DK,
    DV,
    DQ_ACC,
    STAT_M,
    STAT_T,
    STAT_Z,
    STAT_ARG,
    STAT_DELTA,
    STAT_RHO,
    LOCKS,
    LIVE,
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
    seed,
    p_drop,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    DROPOUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    HAS_LIVE: tl.constexpr,
    LIVE_M: tl.constexpr,
    LIVE_N: tl.constexpr,
):
    """One program per key block, streaming the query blocks: 5 GEMMs per live tile (``q kᵀ``, ``dO vᵀ``,
    ``(p d)ᵀ dO -> dv``, ``dsᵀ q -> dk``, ``ds k -> dq``), as FlashAttention-2.

    ``dv`` is final; ``dk`` lacks only the argmax share, which :func:`_bwd_epilogue_kernel` adds in fp32 (``dk``
    waits in the input dtype: see there). The ``dq`` and ``rho`` partials of each query block go to fp32
    accumulators: with ``DETERMINISTIC`` in key-block order (key block ``n`` waits until the row block's counter
    reads ``n``, adds, and sets it to ``n + 1``, also after a tile it skipped), otherwise by atomic adds in
    arrival order. With ``HAS_LIVE``, a tile the forward's bitmask marks dead costs one byte load: no ``q``,
    ``dO``, statistics or GEMM."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    DO += i_b * stride_dob + i_h * stride_doh
    DK += i_b * stride_dkb + i_h * stride_dkh
    DV += i_b * stride_dvb + i_h * stride_dvh
    DQ_ACC += i_bh.to(tl.int64) * T * HEAD_DIM
    LOCKS += i_bh * tl.cdiv(T, BLOCK_M)
    PAD += i_b * stride_pb
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
    b_v = _rows(V, o_n, S, stride_vn, HEAD_DIM)
    b_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD).to(tl.int32)
    key_class = tl.where(tl.max(b_key, 0) > 0, TILE_FULL, 0) | tl.where(tl.min(b_key, 0) == 0, TILE_DEAD, 0)
    m_start = 0
    if CAUSAL:  # query i sees key j iff j <= i + offset; every key block before this one also sees these rows
        m_start = tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M

    b_dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    b_dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for i_m in range(m_start, T, BLOCK_M):
        o_m = i_m + tl.arange(0, BLOCK_M)
        m_m = o_m < T
        o_stat = i_bh.to(tl.int64) * T + o_m
        b_dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        b_rho = tl.zeros([BLOCK_M], tl.float32)
        any_alive = _bwd_live_tile(LIVE, i_bh, i_m, i_n, T, S, BLOCK_N, LIVE_M, LIVE_N, HAS_LIVE)
        any_alive = any_alive & (key_class != TILE_DEAD)  # a key block of padding only: nothing to do but count
        if any_alive:
            b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
            b_do = _rows(DO, o_m, T, stride_dot, HEAD_DIM)
            b_max = tl.load(STAT_M + o_stat, mask=m_m, other=0.0)
            b_t = tl.load(STAT_T + o_stat, mask=m_m, other=0.0)
            b_inv_z = 1.0 / tl.load(STAT_Z + o_stat, mask=m_m, other=1.0)
            b_delta = tl.load(STAT_DELTA + o_stat, mask=m_m, other=0.0)
            b_arg = tl.load(STAT_ARG + o_stat, mask=m_m, other=-1)
            any_alive, b_p, b_ds, b_rho_terms = _bwd_tile(
                b_q, b_do, b_k, b_v, PAD, key_class, i_m // BLOCK_M, i_n * BLOCK_N, b_max, b_t, b_inv_z, b_delta, b_arg,
                i_bh, S, offset, scale, seed, p_drop, stride_pn,
                BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD, DOT_PRECISION, UPCAST, DROPOUT,
            )  # fmt: skip
            if any_alive:
                b_dv += _dot(tl.trans(b_p.to(b_do.dtype)), b_do, DOT_PRECISION, UPCAST)
                b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, DOT_PRECISION, UPCAST)
                b_dq = _dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, UPCAST)
                b_rho = tl.sum(b_rho_terms, 1)
        o_acc = DQ_ACC + o_m[:, None] * HEAD_DIM + o_d[None, :]
        if DETERMINISTIC:
            tl.atomic_poll(LOCKS + i_m // BLOCK_M, i_n)  # key blocks 0 .. i_n - 1 have added theirs
            if any_alive:  # .cg: read the accumulator from L2, where the previous key block stored it
                b_dq += tl.load(o_acc, mask=m_m[:, None], other=0.0, cache_modifier=".cg")
                b_rho += tl.load(STAT_RHO + o_stat, mask=m_m, other=0.0, cache_modifier=".cg")
                tl.store(o_acc, b_dq, mask=m_m[:, None])
                tl.store(STAT_RHO + o_stat, b_rho, mask=m_m)
            tl.debug_barrier()  # every thread's stores are done before the counter releases them
            tl.atomic_store(LOCKS + i_m // BLOCK_M, i_n + 1)
        elif any_alive:
            tl.atomic_add(o_acc, b_dq, mask=m_m[:, None], sem="relaxed")
            tl.atomic_add(STAT_RHO + o_stat, b_rho, mask=m_m, sem="relaxed")
    _store_rows(DK, o_n, S, stride_dkn, b_dk * scale, HEAD_DIM)
    _store_rows(DV, o_n, S, stride_dvn, b_dv, HEAD_DIM)


@triton.jit
def _bwd_epilogue_kernel(
    Q,
    K,
    DQ,
    DK,
    DQ_ACC,
    STAT_M,
    STAT_ARG,
    STAT_RHO,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    H,
    T,
    S,
    offset,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """The argmax share of the gradient, in fp32: the threshold moves with the maximum, so ``dx_{i M(i)} -= rho_i``,
    i.e. ``dq_i -= rho_i k_M(i)`` and ``dk_M -= sum_{i: M(i) = M} rho_i q_i`` (times ``scale``).

    Programs ``[0, cdiv(T, BLOCK_M))`` finish a row block of ``dq`` (a gather of one key row per query row, then
    the cast); the others each take a key block and add the share of the rows whose argmax it holds, scanning the
    argmax of every row that can see it and touching ``q`` and ``dk`` only where some row points into it (a
    one-hot ``ieee`` GEMM per such tile, deterministic). ``rho`` is complete only after every key block ran, which
    is why this is a separate launch rather than the main kernel's epilogue.

    ``dk`` arrives rounded to the input dtype and is rounded again after the share is added. The share itself
    (``rho`` grows like ``1 / Z``) is never rounded first, which is what matters: folded into ``ds``, it was rounded
    per score before the ``dsᵀ q`` GEMM. The second rounding of the rest costs at most what the rest already
    carries from ``ds``'s rounding for that GEMM; carrying ``dk - round(dk)`` to this kernel in one more
    ``[B, H, S, D]`` buffer lowered the largest ``dk`` error of the bf16 tests by at most a quarter (peaky rows,
    ``r >= 0.95``: 0.19 against 0.24 at ``max |dk| = 34``), not worth the memory."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    n_row_blocks = tl.cdiv(T, BLOCK_M)
    if i_p < n_row_blocks:
        o_m = i_p * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < T
        o_stat = i_bh.to(tl.int64) * T + o_m
        b_rho = tl.load(STAT_RHO + o_stat, mask=m_m, other=0.0)
        b_arg = tl.load(STAT_ARG + o_stat, mask=m_m, other=0)
        b_k_arg = _rows(K, tl.where(m_m, b_arg, S), S, stride_kn, HEAD_DIM).to(tl.float32)
        b_dq = _rows(DQ_ACC + i_bh.to(tl.int64) * T * HEAD_DIM, o_m, T, HEAD_DIM, HEAD_DIM) - b_rho[:, None] * b_k_arg
        b_max = tl.load(STAT_M + o_stat, mask=m_m, other=0.0)
        b_dq = tl.where((b_max == b_max)[:, None], b_dq, float("nan"))  # a row with a NaN score
        _store_rows(DQ + i_b * stride_dqb + i_h * stride_dqh, o_m, T, stride_dqt, b_dq * scale, HEAD_DIM)
    else:
        i_n = i_p - n_row_blocks
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_start = 0
        if CAUSAL:  # as in _bwd_kernel: rows before m_start see no key of this block, so none has its argmax here
            m_start = tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        b_share = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        n_hits = 0
        for i_m in range(m_start, T, BLOCK_M):
            o_m = i_m + tl.arange(0, BLOCK_M)
            m_m = o_m < T
            o_stat = i_bh.to(tl.int64) * T + o_m
            b_arg = tl.load(STAT_ARG + o_stat, mask=m_m, other=-1)
            b_hit = o_n[None, :] == b_arg[:, None]  # (BLOCK_M, BLOCK_N): one-hot rows
            if tl.max(b_hit.to(tl.int32)) > 0:
                b_rho = tl.load(STAT_RHO + o_stat, mask=m_m, other=0.0)
                b_rho_q = b_rho[:, None] * _rows(Q, o_m, T, stride_qt, HEAD_DIM).to(tl.float32)
                b_share += tl.dot(tl.trans(b_hit.to(tl.float32)), b_rho_q, input_precision="ieee")
                n_hits += 1
        if n_hits > 0:
            DK += i_b * stride_dkb + i_h * stride_dkh
            b_dk = _rows(DK, o_n, S, stride_dkn, HEAD_DIM).to(tl.float32) - b_share * scale
            _store_rows(DK, o_n, S, stride_dkn, b_dk, HEAD_DIM)


# fmt: on


def _blocks(q: torch.Tensor, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``: the given ones, else the untuned defaults of
    :func:`~hf_sparse_attn.kernels.tuning.default_blocks` (the forward autotunes its blocks on CUDA instead)."""
    default_m, default_n = tuning.default_blocks(q.shape[-1], q.is_cuda)
    return block_m or default_m, block_n or default_n


def dropout_keep_mask(
    seed: int, p: float, batch: int, heads: int, t_len: int, s_len: int, device: torch.device | str
) -> torch.Tensor:
    """The attention-dropout mask the kernels draw for ``(seed, p)``: bool ``[B, H, T, S]``, True = kept.

    Lets a reference reproduce the kernel's dropout exactly: ``r_softmax(scores) * keep / (1 - p) @ v`` (the
    tests do). Counter-based (Philox keyed by ``seed`` and ``b * H + h``, counter ``i * S + j``), so it depends on
    nothing but its arguments.
    """
    keep = torch.empty(batch * heads, t_len, s_len, dtype=torch.int8, device=device)
    grid = (triton.cdiv(t_len, 32), triton.cdiv(s_len, 32), batch * heads)
    _dropout_mask_kernel[grid](keep, seed, p, t_len, s_len, BLOCK_M=32, BLOCK_N=32)
    return keep.view(batch, heads, t_len, s_len).bool()


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
    *,
    dropout: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[int, int]]:
    """Launch the forward: the threshold kernel (a few passes over the keys), then the output kernel (one).

    Args:
        q: ``[B, H, T, D]``; k, v: ``[B, H, S, D]``, same dtype (fp16/bf16/fp32), last dim contiguous.
        key_padding: bool ``[B, S]`` (True = valid key; may be a stride-0 broadcast) or None.
        rate: fp32 ``[H]`` on the device.
        causal: query ``i`` sees key ``j`` iff ``j <= i + S - T`` (queries aligned to the end, as under a KV cache).
        block_m, block_n: the tile of both kernels; on CUDA, both None autotunes it (the threshold kernel chooses
            it, the output kernel tunes its warps and stages for it; :mod:`hf_sparse_attn.kernels.tuning`).
        dropout, seed: attention-dropout probability in ``[0, 1)`` on the probabilities, and the seed of its
            counter-based mask (:func:`dropout_keep_mask`).

    Returns:
        ``(o [B, T, H, D], (m, t, z, argmax, live), (BLOCK_M, BLOCK_N))``: per-row stats ``[B, H, T]`` (fp32 ``m``,
        ``t``, ``z``; int32 ``argmax``) and the threshold kernel's live-tile bitmask, uint8
        ``[B, H, cdiv(T, BLOCK_M), cdiv(S, BLOCK_N)]`` (0 = no row of the row block keeps a positive weight at any key
        of the key block), saved for the backward; the tile both kernels ran with, which ``live`` refers to.
    """
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    found = r_softmax_threshold(q, k, key_padding, rate, causal, scale, eps, block_m, block_n)
    out = torch.empty(batch, t_len, heads, head_dim, dtype=q.dtype, device=q.device)  # (B, T, H, D)
    total = torch.empty_like(found.row_max)
    argmax = torch.empty(batch, heads, t_len, dtype=torch.int32, device=q.device)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    classes = found.tile_classes
    _output_kernel[(triton.cdiv(t_len, found.block_m), batch * heads)](
        q, k, v, pad, q if classes is None else classes, found.live, out, found.row_max, found.margin, total, argmax,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        stride_pb, stride_pn, 0 if classes is None else classes.stride(0),
        heads, t_len, s_len, s_len - t_len, scale, seed, dropout, tuning.s_bucket(s_len),
        HEAD_DIM=head_dim, BLOCK_M=found.block_m, BLOCK_N=found.block_n, CLASS_BLOCK=found.class_block,
        CAUSAL=causal, HAS_PAD=key_padding is not None, DROPOUT=dropout > 0, **kernel_options(q),
        **launch_options(q, tuned=True), **found.launch,  # the search's tile, warps and stages: the same scores
    )  # fmt: skip
    return out, (found.row_max, found.margin, total, argmax, found.live), (found.block_m, found.block_n)


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
    *,
    dropout: float = 0.0,
    seed: int = 0,
    deterministic: bool = True,
    live_blocks: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: ``do``/``out`` ``[B, T, H, D]``, ``stats`` the forward's ``(m, t, z, argmax, live)``,
    ``live_blocks`` the ``(BLOCK_M, BLOCK_N)`` the forward ran with, the rest as in :func:`r_softmax_attention_fwd`
    (the same ``dropout`` and ``seed``). Tiles the bitmask ``live`` marks dead are skipped when each backward tile
    lies inside one forward tile (the forward's blocks are multiples of the backward's); else every tile is
    computed (the in-tile test alone).

    Three launches: ``delta = dO·O`` per row (zeroing the accumulators), the key-parallel kernel (5 GEMMs per live
    tile; ``dv`` final, ``dk`` without the argmax share, ``dq`` and ``rho`` summed over key blocks into fp32
    accumulators), and the fp32 argmax epilogue that finishes ``dq`` and ``dk``. ``deterministic=True`` (default)
    orders the ``dq``/``rho`` sums by key block, so repeated calls give bit-identical gradients;
    ``deterministic=False`` uses atomic adds instead (no waiting; fp32 sums in arrival order).

    Workspace beyond the gradients: ``dq`` in fp32 (``B H T D``, as FlashAttention-2), ``delta`` and ``rho``
    (``B H T``), in deterministic mode one int32 counter per row block.

    Returns ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``."""
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    stat_m, stat_t, stat_z, argmax, live = stats
    if block_n is None and live_blocks is not None:  # nest in the forward's tiles, so that its bitmask applies
        block_n = min(_blocks(q, None, None)[1], live_blocks[1])  # powers of 2: the smaller divides the larger
    block_m, block_n = _blocks(q, block_m, block_n)
    has_live = live_blocks is not None and live_blocks[0] % block_m == 0 and live_blocks[1] % block_n == 0
    live_m, live_n = live_blocks if has_live else (block_m, block_n)  # constexprs: no compilation per unused tile
    row_blocks, key_blocks = triton.cdiv(t_len, block_m), triton.cdiv(s_len, block_n)
    delta = torch.empty_like(stat_m)  # (B, H, T)
    rho = torch.empty_like(stat_m)
    dq_acc = torch.empty(batch, heads, t_len, head_dim, dtype=torch.float32, device=q.device)
    locks = torch.empty(batch * heads, row_blocks, dtype=torch.int32, device=q.device)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    options = launch_options(q, tuned=False)
    _bwd_preprocess_kernel[(row_blocks, batch * heads)](
        out, do, dq_acc, delta, rho, locks,
        out.stride(0), out.stride(2), out.stride(1),
        do.stride(0), do.stride(2), do.stride(1),
        heads, t_len,
        HEAD_DIM=head_dim, BLOCK_M=block_m, DETERMINISTIC=deterministic, **options,
    )  # fmt: skip
    _bwd_kernel[(key_blocks, batch * heads)](  # key blocks vary fastest: the counter waits cannot deadlock
        q, k, v, pad, do, dk, dv, dq_acc, stat_m, stat_t, stat_z, argmax, delta, rho, locks, live,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(2), do.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, seed, dropout,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_PAD=key_padding is not None,
        DROPOUT=dropout > 0, DETERMINISTIC=deterministic, HAS_LIVE=has_live, LIVE_M=live_m,
        LIVE_N=live_n, **kernel_options(q), **options,
    )  # fmt: skip
    _bwd_epilogue_kernel[(row_blocks + key_blocks, batch * heads)](
        q, k, dq, dk, dq_acc, stat_m, argmax, rho,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        heads, t_len, s_len, s_len - t_len, scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, **options,
    )  # fmt: skip
    return dq, dk, dv


class RSoftmaxAttentionFunction(torch.autograd.Function):
    """``RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, causal, scale, eps[, blocks, dropout, seed])
    -> o [B, T, H, D]``.

    Arguments as in :func:`r_softmax_attention_fwd`; ``blocks`` optionally fixes ``(BLOCK_M, BLOCK_N)`` (tests);
    ``dropout`` (default 0) and ``seed`` select the attention-dropout mask (:func:`dropout_keep_mask`).
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
        dropout: float = 0.0,
        seed: int = 0,
    ) -> torch.Tensor:
        block_m, block_n = blocks or (None, None)
        out, stats, ctx.live_blocks = r_softmax_attention_fwd(
            q, k, v, key_padding, rate, causal, scale, eps, block_m, block_n, dropout=dropout, seed=seed
        )
        # saved: q, k, v, out, key_padding, m, t, z, argmax and the live-tile bitmask of the (BLOCK_M, BLOCK_N) tiles
        # in ctx.live_blocks (the forward's, tuned on CUDA; the backward may use other blocks)
        ctx.save_for_backward(q, k, v, out, key_padding, *stats)
        ctx.causal, ctx.scale, ctx.blocks, ctx.dropout, ctx.seed = causal, scale, (block_m, block_n), dropout, seed
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, do: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, key_padding, *stats = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = r_softmax_attention_bwd(
            do, q, k, v, out, key_padding, tuple(stats), ctx.causal, ctx.scale, *ctx.blocks,
            dropout=ctx.dropout, seed=ctx.seed, live_blocks=ctx.live_blocks,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None, None
