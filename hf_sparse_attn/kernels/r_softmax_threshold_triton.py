"""The r-softmax threshold of every query row, exactly, in a few passes over the keys (Triton).

Per query row ``i`` with ``k`` valid keys and scores ``x_j = scale q_i·k_j``, the attention kernels need the row
maximum ``m`` and the margin ``t = (m - q_r) + eps``, where ``q_r`` is the r-quantile of the valid scores: the
order statistics at ranks ``lo = floor(r (k-1))`` and ``hi = ceil(r (k-1))`` (0-based, ascending), linearly
interpolated with ``torch.lerp``'s formula, as :func:`hf_sparse_attn.ops.r_softmax_margin` computes them. This
kernel finds both order statistics *exactly* (bit for bit the values a sort would give) without the ``[T, S]``
matrix: each pass streams the key blocks once, recomputing ``q kᵀ``.

Search (per row; a program handles ``BLOCK_M`` rows and runs until all of them are done):

- The row keeps a *window* ``(a, b]`` of values with exact counts ``c_a = #{x <= a}`` and ``c_b = #{x <= b}`` that
  contains both target ranks (``c_a <= lo <= hi < c_b``); it starts as ``(-inf, +inf]``.
- Each pass splits the window into ``NUM_BUCKETS = 16`` buckets at 15 pivots ``p_1 < ... < p_15`` and counts the
  window's scores per bucket (the 16 counts travel packed as 8-bit lanes of two int64 words per row, so one
  reduction per word and tile). The same pass finds the window's smallest and largest score, which are the
  order statistics at ranks ``c_a`` and ``c_b - 1``. After the pass, a target rank equal to one of these (or a
  window whose smallest and largest scores are equal) is *pinned*; otherwise the window shrinks to the one or
  two buckets holding the targets, with their exact counts from the histogram. The first pass also yields ``m``,
  ``k`` and whether a valid score is NaN.
- Pivots: pass 1 centres them on a guess of the quantile from the Gaussian model of the scores given by the mean
  and covariance of the keys (``mu + sigma Phi^-1(r)``, computed by the launcher), ``GUESS_SPREAD`` standard
  deviations either side; later passes centre them on the target rank's linear interpolation inside the window,
  ``ZOOM`` sampling standard deviations either side, or spread them evenly over the window when that is
  narrower. The two outer buckets reach to the window's ends, so a bad guess only costs the pass's precision:
  after a target lands in an outer bucket the next pass spreads its pivots evenly.
- Exactness: value pivots are ``fma(j, w, base)``, computed identically per score and per row; each score's
  bucket comes from ``floor((x - base) / w)`` and is corrected against the two neighbouring pivots, so bucket
  counts are exact counts of ``x <= p_j``. When a window is too narrow for distinct value pivots (fewer than
  about ``2^16`` ulps across) or an even split failed to halve the window's count (heavy tails, scores spread
  over many binades), the row switches for good to pivots on the order-preserving integer image of the floats,
  ``NUM_BUCKETS`` equal key ranges per pass (at least 3 bits of the 32 per pass), so every row finishes.

``PASSES`` receives each program's pass count (the block's slowest row decides it): the instrumented counter
that the tests and ``benchmarks/bench_threshold_passes.py`` read. With the output pass, the forward streams the
keys ``passes + 1`` times.

Tiles: the launcher classes every key block of every batch row once (:func:`key_tile_classes`: all valid, none
valid, mixed); a tile of padding only costs its class byte, only a mixed tile loads the padding, and only a tile
crossing the causal diagonal compares positions (``_valid_scores``: invalid scores become ``-inf``). Every pass
also writes ``LIVE``, a conservative bitmask of the key tiles where some row may keep a positive weight (the
argument is in ``_threshold_kernel``'s docstring), which the output kernel uses to skip dead tiles entirely.

Rows: no valid key gives ``m = 0, t = eps``; a NaN among the valid scores gives ``m = t = NaN`` (the attention
output of that row is NaN, as with softmax).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from hf_sparse_attn.kernels import tuning

__all__ = ["NUM_BUCKETS", "Threshold", "key_tile_classes", "r_softmax_threshold", "threshold_guess"]

#: buckets per pass; the packed counting below is written for 16 (two int64 words of eight 8-bit lanes)
NUM_BUCKETS = 16
#: pass 1: the pivots span the Gaussian guess of the quantile +- GUESS_SPREAD standard deviations of the scores
GUESS_SPREAD = 0.75
#: keys sampled (evenly strided) for the mean and covariance behind the first pivots
GUESS_KEYS = 256
#: later passes: the pivots span the interpolated rank position +- ZOOM sampling standard deviations
ZOOM = 3.5
#: hard cap on passes (never reached: key pivots finish any window in at most 11 passes)
MAX_PASSES = 64


# fmt: off  (kernel signatures group their strides by tensor)
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


#: key-tile classes, as bits: 1 = the tile holds a valid key, 2 = it holds an invalid one (padding, or past ``S``);
#: a tile's class is the OR of its sub-blocks' classes
TILE_FULL: tl.constexpr = tl.constexpr(1)
TILE_DEAD: tl.constexpr = tl.constexpr(2)
TILE_MIXED: tl.constexpr = tl.constexpr(3)


@triton.jit
def _tile_class(CLASS, i_n, S, n_class, BLOCK_N: tl.constexpr, CLASS_BLOCK: tl.constexpr, HAS_PAD: tl.constexpr):
    """Class of the key tile ``[i_n, i_n + BLOCK_N)``: ``TILE_FULL``, ``TILE_DEAD`` or ``TILE_MIXED``. With key
    padding, the OR of the ``BLOCK_N / CLASS_BLOCK`` classes the launcher computed (:func:`key_tile_classes`, row
    ``CLASS`` of ``n_class`` entries); without, only a ragged last tile is mixed."""
    if HAS_PAD:
        if BLOCK_N == CLASS_BLOCK:
            return tl.load(CLASS + i_n // CLASS_BLOCK).to(tl.int32)
        o_c = i_n // CLASS_BLOCK + tl.arange(0, BLOCK_N // CLASS_BLOCK)
        b_c = tl.load(CLASS + o_c, mask=o_c < n_class, other=TILE_DEAD).to(tl.int32)  # keys past S: invalid
        return tl.max(b_c & TILE_FULL, 0) | tl.max(b_c & TILE_DEAD, 0)
    return tl.where(i_n + BLOCK_N <= S, TILE_FULL, TILE_MIXED)


@triton.jit
def _valid_scores(
    b_s,
    PAD,
    key_class,
    i_m,
    i_n,
    S,
    offset,
    stride_pn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    """The tile's scores ``b_s`` with ``-inf`` where key ``j`` is padding, past ``S``, or (``CAUSAL``) after
    ``i + offset``; only a tile of class ``TILE_MIXED`` or crossing the causal diagonal pays for the test, and only
    a mixed one loads the padding. ``-inf`` never survives and never enters a search window, which starts at
    ``(-inf, +inf]``. Rows past ``T`` are not masked: the kernels never store them."""
    m_mixed = key_class == TILE_MIXED
    m_test = m_mixed
    if CAUSAL:  # the tile's last key is after the block's first query's position
        m_test = m_test | (i_n + BLOCK_N - 1 > i_m * BLOCK_M + offset)
    if m_test:
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_key = o_n < S
        if HAS_PAD:
            m_load = tl.where(m_mixed, m_key, False)  # (not `m_key & m_mixed`: the interpreter rejects that mask)
            m_key = m_key & (tl.load(PAD + o_n.to(tl.int64) * stride_pn, mask=m_load, other=1) != 0)
        m_valid = m_key[None, :]
        if CAUSAL:
            o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_valid = m_valid & (o_n[None, :] <= o_m[:, None] + offset)
        b_s = tl.where(m_valid, b_s, float("-inf"))
    return b_s


@triton.jit
def _float_key(x):
    """Order-preserving int32 image of float32 ``x`` with ``-0.0`` and ``0.0`` both mapped to 0 (they compare
    equal as floats); no float maps to -1."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(x == 0.0, 0, tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF))


@triton.jit
def _key_pivot(key):
    """The float ``p`` with ``x <= p`` iff ``_float_key(x) <= key`` (int64 ``key`` in the int32 range)."""
    key = tl.where(key == -1, -2, key).to(tl.int32)
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _value_pivot(j, base, w):
    """Value pivot ``j`` of a row: one rounding, so that rows and scores compute the same float."""
    return tl.fma(j, w, base)


@triton.jit
def _pivot(j, base, w, k_lo, shift, k_span, m_keys):
    """Pivot ``j`` (``1 <= j < NUM_BUCKETS``; ``[BLOCK_M]``) of each row, by value or by key."""
    k_off = tl.minimum((j.to(tl.int64) << shift) - 1, k_span)
    return tl.where(m_keys, _key_pivot(k_lo + k_off), _value_pivot(j.to(tl.float32), base, w))


@triton.jit
def _quantile(x_lo, x_hi, b_frac):
    """torch.lerp's formula with its single rounding (ATen's vectorised CPU lerp and the CUDA one are FMAs), so that
    the quantile matches torch.quantile's bit for bit. It is at least ``x_lo`` (``x_lo <= x_hi``, ``0 <= frac < 1``)."""
    small = b_frac < 0.5
    return tl.fma(tl.where(small, b_frac, b_frac - 1.0), x_hi - x_lo, tl.where(small, x_lo, x_hi))


@triton.jit
def _threshold_kernel(
    Q,
    K,
    PAD,
    CLASS,
    RATE,
    GUESS,
    STAT_M,
    STAT_T,
    PASSES,
    LIVE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_pb,
    stride_pn,
    stride_cb,
    H,
    T,
    S,
    offset,
    scale,
    eps,
    s_bucket,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CLASS_BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    NUM_BUCKETS: tl.constexpr,
    ZOOM: tl.constexpr,
    MAX_PASSES: tl.constexpr,
):
    """The search of the module docstring for ``BLOCK_M`` rows; ``s_bucket`` is only the autotuning key.

    ``LIVE [B * H, cdiv(T, BLOCK_M), cdiv(S, BLOCK_N)]`` receives, per key tile, whether some row of the block may
    keep a positive weight there. Every pass rewrites it, so the last pass's (tightest) bounds remain: a tile is
    live when ``(max_j x_ij - m_i) + t'_i > 0`` for a row ``i < T``, computed in fp32 exactly as the output kernel
    computes ``u_ij = (x_ij - m_i) + t_i``, with ``t'_i >= t_i``:

    - a row finished before the pass: ``t'`` is its final margin, bit for bit;
    - a row still searching: ``t' = (m - q') + eps`` with ``q'`` a lower bound of the quantile: ``x_lo`` once
      pinned, else the window's lower end ``a`` (the window ``(a, b]`` holds rank ``lo``, so ``x_lo > a``; the
      quantile is at least ``x_lo``, see ``_quantile``);
    - pass 1 (``m`` unknown yet), or a window still open below (``a = -inf``): ``t' = +inf``, every valid score
      may live.

    Rounding is monotone, so ``q' <= q`` gives ``t' >= t`` and ``u' >= u`` for every score; ``u`` grows with
    ``x``, so the tile's row maximum decides. A tile marked dead therefore has ``u <= 0`` at every valid entry of
    every row: no weight. This relies on the output kernel recomputing the same fp32 scores (same tile shapes
    and code), as its argmax (first ``x = m``) already does. Invalid entries are ``-inf`` (``u`` is ``-inf`` or
    NaN, never positive); rows past ``T`` do not count."""
    tl.static_assert(NUM_BUCKETS == 16)  # the packed counting holds two words of eight 8-bit lanes
    tl.static_assert(BLOCK_N < 256)  # a lane counts at most BLOCK_N scores per tile
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    PAD += i_b * stride_pb
    CLASS += i_b * stride_cb
    n_class = tl.cdiv(S, CLASS_BLOCK)
    n_tiles = tl.cdiv(S, BLOCK_N)
    LIVE += (i_bh.to(tl.int64) * tl.num_programs(0) + i_m) * n_tiles
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < T
    o_stat = i_bh.to(tl.int64) * T + o_m
    b_q = _rows(Q, o_m, T, stride_qt, HEAD_DIM)
    n_end = S
    if CAUSAL:
        n_end = tl.maximum(tl.minimum(S, (i_m + 1) * BLOCK_M + offset), 0)
    for i_n in range(tl.cdiv(n_end, BLOCK_N) * BLOCK_N, S, BLOCK_N):  # tiles after every row's last key: dead
        tl.store(LIVE + i_n // BLOCK_N, tl.zeros([], tl.uint8))
    o_b = tl.arange(0, NUM_BUCKETS)
    rate = tl.load(RATE + i_h)

    # window (a, b] with c_a = #{x <= a}, c_b = #{x <= b}; pass 1 takes the launcher's guess for its pivots
    a = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b = tl.full([BLOCK_M], float("inf"), tl.float32)
    c_a = tl.zeros([BLOCK_M], tl.int32)
    c_b = tl.zeros([BLOCK_M], tl.int32)
    w = tl.load(GUESS + 2 * o_stat + 1, mask=m_m, other=1.0)
    base = tl.load(GUESS + 2 * o_stat, mask=m_m, other=0.0) - (NUM_BUCKETS // 2) * w
    # the pins: rank ce_lo holds min{x > e_lo}, rank ce_hi - 1 holds max{x <= e_hi} (the window's ends, or a
    # pivot between the two targets when they fell into different buckets: a split)
    e_lo, e_hi, ce_lo, ce_hi = a, b, c_a, c_b
    m_split = tl.zeros([BLOCK_M], tl.int1)
    m_keys = tl.zeros([BLOCK_M], tl.int1)  # rows whose pivots are key ranges (sticky)
    m_zoom = tl.full([BLOCK_M], 1, tl.int1)  # the pivots span less than the window (outer buckets catch misses)
    k_lo = tl.zeros([BLOCK_M], tl.int64)
    k_span = tl.zeros([BLOCK_M], tl.int64)
    shift = tl.zeros([BLOCK_M], tl.int64)
    # results: the row max, count, NaN flag and the two order statistics once pinned
    b_max = tl.zeros([BLOCK_M], tl.float32)
    b_cnt = tl.zeros([BLOCK_M], tl.int32)
    m_nan = tl.zeros([BLOCK_M], tl.int1)
    x_lo = tl.zeros([BLOCK_M], tl.float32)
    x_hi = tl.zeros([BLOCK_M], tl.float32)
    m_lo_done = tl.zeros([BLOCK_M], tl.int1)
    m_hi_done = tl.zeros([BLOCK_M], tl.int1)
    m_done = tl.zeros([BLOCK_M], tl.int1)
    b_lo = tl.zeros([BLOCK_M], tl.int32)
    b_hi = tl.zeros([BLOCK_M], tl.int32)
    b_frac = tl.zeros([BLOCK_M], tl.float32)
    inv_w = 1.0 / w

    n_pass = 0
    todo = 1
    while todo > 0:
        any_keys = tl.max((m_keys & ~m_done).to(tl.int32), 0) > 0
        # the live-tile test's margin bound t' >= t (see the docstring); "open" rows have t' = +inf (every valid
        # score may live) until m and a finite lower bound of the quantile are known
        q_low = tl.where(m_done, _quantile(x_lo, x_hi, b_frac), tl.where(m_lo_done, x_lo, a))
        m_open = (n_pass == 0) | (q_low == float("-inf"))
        t_live = tl.where(m_open, 0.0, (b_max - q_low) + eps)
        cnt = tl.zeros([BLOCK_M, NUM_BUCKETS], tl.int32)
        b_small = tl.full([BLOCK_M], float("inf"), tl.float32)  # min{x > e_lo}: rank ce_lo
        b_large = tl.full([BLOCK_M], float("-inf"), tl.float32)  # max{x <= e_hi}: rank ce_hi - 1
        for i_n in range(0, n_end, BLOCK_N):
            key_class = _tile_class(CLASS, i_n, S, n_class, BLOCK_N, CLASS_BLOCK, HAS_PAD)
            m_live = tl.zeros([], tl.int1)
            if key_class != TILE_DEAD:  # a tile of padding only costs its class byte
                b_k = _rows(K, i_n + tl.arange(0, BLOCK_N), S, stride_kn, HEAD_DIM)
                b_s = _dot(b_q, tl.trans(b_k), DOT_PRECISION, UPCAST) * scale
                b_s = _valid_scores(
                    b_s, PAD, key_class, i_m, i_n, S, offset, stride_pn, BLOCK_M, BLOCK_N, CAUSAL, HAS_PAD
                )
                b_top = tl.max(b_s, 1)  # u grows with the score: the row's largest decides
                m_live_rows = m_m & (b_top > float("-inf")) & (m_open | ((b_top - b_max) + t_live > 0))
                m_live = tl.max(m_live_rows.to(tl.int32), 0) > 0
                if n_pass == 0:
                    m_nan = m_nan | (tl.max((b_s != b_s).to(tl.int32), 1) > 0)
                m_win = (b_s > a[:, None]) & (b_s <= b[:, None])
                b_small = tl.minimum(b_small, tl.min(tl.where(m_win & (b_s > e_lo[:, None]), b_s, float("inf")), 1))
                b_large = tl.maximum(b_large, tl.max(tl.where(m_win & (b_s <= e_hi[:, None]), b_s, float("-inf")), 1))
                # bucket = number of pivots below the score: approximate, then corrected by the two nearest pivots
                f_idx = tl.minimum(tl.maximum((b_s - base[:, None]) * inv_w[:, None], 0.0), NUM_BUCKETS - 1.0)
                f_idx = tl.floor(tl.where(f_idx == f_idx, f_idx, 0.0))
                p_below = _value_pivot(f_idx, base[:, None], w[:, None])
                p_above = _value_pivot(f_idx + 1.0, base[:, None], w[:, None])
                idx = f_idx.to(tl.int32)
                idx = (
                    idx
                    - ((idx > 0) & (b_s <= p_below)).to(tl.int32)
                    + ((idx < NUM_BUCKETS - 1) & (b_s > p_above)).to(tl.int32)
                )
                if any_keys:
                    k_off = (_float_key(b_s).to(tl.uint32) - k_lo[:, None].to(tl.uint32)) >> shift[:, None].to(
                        tl.uint32
                    )
                    k_idx = tl.minimum(k_off, NUM_BUCKETS - 1).to(tl.int32)
                    idx = tl.where(m_keys[:, None], k_idx, idx)
                # 16 counts per row in 8-bit lanes of two words: one reduction per word
                lane = tl.where(m_win, tl.full([BLOCK_M, BLOCK_N], 1, tl.int64) << ((idx & 7) * 8).to(tl.int64), 0)
                word_lo = tl.sum(tl.where(idx < 8, lane, 0), 1)
                word_hi = tl.sum(tl.where(idx >= 8, lane, 0), 1)
                words = tl.where(o_b[None, :] < 8, word_lo[:, None], word_hi[:, None])
                cnt += ((words >> ((o_b[None, :] & 7) * 8).to(tl.int64)) & 255).to(tl.int32)
            tl.store(LIVE + i_n // BLOCK_N, m_live.to(tl.uint8))

        cum = tl.cumsum(cnt, 1)  # (BLOCK_M, NUM_BUCKETS) #{a < x <= upper end of bucket}
        if n_pass == 0:  # the whole row was the window: its max, count and target ranks
            b_cnt = tl.sum(cnt, 1)
            c_b = b_cnt
            ce_hi = b_cnt
            b_max = tl.where(b_cnt == 0, 0.0, b_large)  # a row without valid keys: 0
            b_pos = rate * tl.maximum(b_cnt - 1, 0).to(tl.float32)
            b_lo = tl.floor(b_pos).to(tl.int32)
            b_hi = tl.ceil(b_pos).to(tl.int32)
            b_frac = b_pos - b_lo.to(tl.float32)
            m_lo_done = m_lo_done | (b_cnt == 0) | m_nan | ~m_m
            m_hi_done = m_hi_done | (b_cnt == 0) | m_nan | ~m_m
        # pin the targets at the window's ends or beside the split (or in a window of equal scores)
        m_same = ~m_split & (b_small == b_large)
        pin_lo = ~m_lo_done & ((b_lo == ce_lo) | (b_lo == ce_hi - 1) | m_same)
        x_lo = tl.where(pin_lo, tl.where(b_lo == ce_hi - 1, b_large, b_small), x_lo)
        pin_hi = ~m_hi_done & ((b_hi == ce_lo) | (b_hi == ce_hi - 1) | m_same)
        x_hi = tl.where(pin_hi, tl.where(b_hi == ce_hi - 1, b_large, b_small), x_hi)
        m_lo_done = m_lo_done | pin_lo
        m_hi_done = m_hi_done | pin_hi
        m_done = m_lo_done & m_hi_done
        # shrink the window to the buckets holding the targets not pinned yet
        r_lo = tl.where(m_lo_done, b_hi, b_lo)
        r_hi = tl.where(m_hi_done, b_lo, b_hi)
        j_lo = tl.sum((c_a[:, None] + cum <= r_lo[:, None]).to(tl.int32), 1)
        j_hi = tl.sum((c_a[:, None] + cum <= r_hi[:, None]).to(tl.int32), 1)
        j_lo = tl.minimum(j_lo, NUM_BUCKETS - 1)
        j_hi = tl.minimum(j_hi, NUM_BUCKETS - 1)
        n_old = c_b - c_a
        c_b_new = c_a + tl.sum(tl.where(o_b[None, :] <= j_hi[:, None], cnt, 0), 1)
        c_a_new = c_a + tl.sum(tl.where(o_b[None, :] < j_lo[:, None], cnt, 0), 1)
        # pivots outside the window leave its end where it was (the buckets beyond it are empty)
        p_lo = _pivot(tl.maximum(j_lo, 1), base, w, k_lo, shift, k_span, m_keys)
        p_hi = _pivot(tl.minimum(j_hi + 1, NUM_BUCKETS - 1), base, w, k_lo, shift, k_span, m_keys)
        a_new = tl.where(j_lo > 0, tl.maximum(a, p_lo), a)
        b_new = tl.where(j_hi < NUM_BUCKETS - 1, tl.minimum(b, p_hi), b)
        m_miss = m_zoom & ~m_keys & ((j_lo == 0) | (j_hi == NUM_BUCKETS - 1))
        m_stall = ~m_zoom & ~m_keys & (2 * (c_b_new - c_a_new) > n_old)
        a = tl.where(m_done, a, a_new)
        b = tl.where(m_done, b, b_new)
        c_a = tl.where(m_done, c_a, c_a_new)
        c_b = tl.where(m_done, c_b, c_b_new)
        # targets in different buckets: #{x <= p} = lo + 1 at the pivot p above lo's bucket, so the next pass
        # pins x_lo = max{x <= p} and x_hi = min{x > p}
        m_split = j_lo < j_hi
        p_mid = _pivot(tl.minimum(j_lo + 1, NUM_BUCKETS - 1), base, w, k_lo, shift, k_span, m_keys)
        c_mid = c_a_new + tl.sum(tl.where(o_b[None, :] == j_lo[:, None], cnt, 0), 1)
        e_lo = tl.where(m_split, p_mid, a)
        e_hi = tl.where(m_split, p_mid, b)
        ce_lo = tl.where(m_split, c_mid, c_a)
        ce_hi = tl.where(m_split, c_mid, c_b)
        # next pivots: the window's value range [lo_v, hi_v] (bounds, not necessarily scores)
        lo_v = tl.where(m_done, 0.0, tl.maximum(a, b_small))  # finished rows (empty ones too): any finite value
        hi_v = tl.where(m_done, 0.0, tl.minimum(b, b_large))
        span = hi_v - lo_v
        n_win = tl.maximum(c_b - c_a, 1).to(tl.float32)
        f = tl.minimum(tl.maximum(((r_lo - c_a).to(tl.float32) + 0.5) / n_win, 0.0), 1.0)
        w_even = span / NUM_BUCKETS
        w_zoom = 2.0 * ZOOM * span * tl.sqrt(f * (1.0 - f) / n_win + 1.0 / (n_win * n_win)) / (NUM_BUCKETS - 2)
        # value pivots at least 2^-16 of the window's magnitude apart keep the bucket correction exact
        w_min = 1.52587890625e-05 * tl.maximum(tl.abs(lo_v), tl.abs(hi_v))
        m_zoom = ~m_miss & (w_zoom < w_even)
        w = tl.where(m_zoom, tl.maximum(w_zoom, w_min), w_even)
        base = tl.where(m_zoom, lo_v + f * span - (NUM_BUCKETS // 2) * w, lo_v)
        too_narrow = w_even <= w_min
        m_keys = m_keys | too_narrow | m_stall
        w = tl.where(m_keys, 1.0, w)
        base = tl.where(m_keys, 0.0, base)
        inv_w = 1.0 / w
        # key pivots: NUM_BUCKETS ranges of 2^shift keys from the window's smallest possible key
        k_lo = _float_key(lo_v).to(tl.int64)
        k_span = _float_key(hi_v).to(tl.int64) - k_lo
        top = tl.maximum(k_span, 1).to(tl.float32).to(tl.int32, bitcast=True)
        shift = tl.maximum(((top >> 23) & 255) - 127 - 3, 0).to(tl.int64)  # floor(log2 span) + 1 - log2(16)
        n_pass += 1
        todo = tl.where(n_pass < MAX_PASSES, tl.max(tl.where(m_done, 0, 1), 0), 0)

    b_quantile = _quantile(x_lo, x_hi, b_frac)
    m_empty = b_cnt == 0
    b_max = tl.where(m_nan, float("nan"), b_max)
    b_t = tl.where(m_nan, float("nan"), tl.where(m_empty, eps, (b_max - b_quantile) + eps))
    tl.store(STAT_M + o_stat, b_max, mask=m_m)
    tl.store(STAT_T + o_stat, b_t, mask=m_m)
    tl.store(PASSES + i_bh * tl.num_programs(0) + i_m, n_pass)


# fmt: on


def threshold_guess(
    q: torch.Tensor, k: torch.Tensor, key_padding: torch.Tensor | None, rate: torch.Tensor, scale: float
) -> torch.Tensor:
    """First pivots of the search: ``[B, H, T, 2]`` fp32 ``(centre, bucket width)`` per query row.

    Models row ``i``'s scores as Gaussian with the mean ``scale q_i·mean(k)`` and variance
    ``scale^2 q_iᵀ Cov(k) q_i`` over the (batch's valid) keys, and centres the pivots on its r-quantile
    ``mu + sigma Phi^-1(r)``, spanning ``GUESS_SPREAD`` standard deviations either side. Only the pass count
    depends on it, never the result. The key statistics come from at most ``GUESS_KEYS`` evenly strided keys (a
    small fp32 copy); ``O(B H T D^2)`` work, no host sync.
    """
    qf = q.float()
    stride = max(1, k.shape[2] // GUESS_KEYS)
    kf = k[:, :, ::stride].float()  # (B, H, S', D), S' <= 2 GUESS_KEYS
    if key_padding is None:
        weights = kf.new_full((1, 1, kf.shape[2], 1), 1.0 / kf.shape[2])  # (1, 1, S', 1)
    else:
        valid = key_padding[:, ::stride].to(torch.float32)[:, None, :, None]  # (B, 1, S', 1)
        weights = valid / valid.sum(2, keepdim=True).clamp(min=1.0)
    mean = (kf * weights).sum(2, keepdim=True)  # (B, H, 1, D)
    centred = (kf - mean) * weights.sqrt()  # (B, H, S, D)
    cov = centred.transpose(-1, -2) @ centred  # (B, H, D, D)
    mu = scale * (qf @ mean.transpose(-1, -2)).squeeze(-1)  # (B, H, T)
    sd = scale * ((qf @ cov) * qf).sum(-1).clamp(min=0.0).sqrt()  # (B, H, T)
    z = torch.special.ndtri(rate.float().clamp(1e-3, 1 - 1e-3)).view(1, -1, 1)  # (1, H, 1)
    centre = mu + sd * z
    width = 2.0 * GUESS_SPREAD * sd / (NUM_BUCKETS - 2)
    # keep the pivots distinct in fp32 (and finite): at least 2^-12 of the centre's magnitude apart
    width = torch.maximum(width, centre.abs() * 2.0**-12).clamp(min=1e-30)
    good = torch.isfinite(centre) & torch.isfinite(width)
    return torch.stack([centre.where(good, 0.0), width.where(good, 1.0)], dim=-1).contiguous()


def _padding_args(key_padding: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The padding pointer and its (batch, key) strides; a dummy when every key is valid."""
    if key_padding is None:
        return q, 0, 0  # never read: HAS_PAD is False
    return key_padding, key_padding.stride(0), key_padding.stride(1)


def launch_options(q: torch.Tensor, tuned: bool) -> dict:
    """Launch options of every r-softmax attention kernel: on CUDA, no FP fusion (each score ``q k^T * scale`` is
    rounded before it is compared, subtracted or searched, as on the interpreter, so that the threshold, output and
    backward kernels all see the same fp32 scores: Triton 3.9 fuses by default, and ``q k^T * scale - m`` as one FMA
    would break the output kernel's ``x = m`` argmax test, the live-tile bitmask's rounding argument, and the
    backward's ``c_j = 1[u_j > 0]`` agreeing with the forward's), plus the untuned warps and stages unless
    autotuning picks them. Triton's interpreter takes none."""
    if not q.is_cuda:
        return {}
    return {"enable_fp_fusion": False, **({} if tuned else tuning.DEFAULT_LAUNCH)}


def kernel_options(q: torch.Tensor) -> dict:
    """Dot precision and the interpreter's bf16 workaround, shared by every r-softmax attention kernel."""
    return {
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": not q.is_cuda and q.dtype == torch.bfloat16,
    }


def key_tile_classes(key_padding: torch.Tensor, block: int) -> torch.Tensor:
    """Class of every ``block`` keys of every batch row: int8 ``[B, cdiv(S, block)]``, bit 1 = some key valid,
    bit 2 = some key padding or past ``S`` (``TILE_FULL = 1``, ``TILE_DEAD = 2``, ``TILE_MIXED = 3``).

    Computed once per forward on the device, without a host sync or a copy of the padding (per-block counts of a
    view); a stride-0 (broadcast) batch dimension stays one row."""
    valid = key_padding[:1] if key_padding.stride(0) == 0 else key_padding  # (B or 1, S)
    rows, s_len = valid.shape
    full, n_blocks = s_len // block, triton.cdiv(s_len, block)
    strides = (valid.stride(0), block * valid.stride(1), valid.stride(1))
    tiles = valid.as_strided((rows, full, block), strides, valid.storage_offset())  # (B or 1, S // block, block)
    counts = tiles.sum(-1, dtype=torch.int32)  # (B or 1, S // block)
    if n_blocks > full:  # the ragged last block: its keys past S count as invalid
        counts = torch.cat([counts, valid[:, full * block :].sum(-1, keepdim=True, dtype=torch.int32)], dim=1)
    classes = (counts > 0).to(torch.int8) + 2 * (counts < block).to(torch.int8)  # (B or 1, cdiv(S, block))
    return classes.expand(key_padding.shape[0], n_blocks)


@dataclasses.dataclass(frozen=True)
class Threshold:
    """What :func:`r_softmax_threshold` returns.

    Attributes:
        row_max, margin: fp32 ``[B, H, T]``: ``m`` and ``t = m - q_r + eps``
            (as :func:`hf_sparse_attn.ops.r_softmax_margin`).
        passes: int32 ``[B * H, cdiv(T, block_m)]``, the passes over the keys each row block took.
        live: uint8 ``[B, H, cdiv(T, block_m), cdiv(S, block_n)]``, 0 where no row of the row block keeps a positive
            weight at any key of the key block (1 = may be live; conservative, see ``_threshold_kernel``).
        block_m, block_n: the tile the search ran with (tuned on CUDA unless fixed), which ``live`` refers to.
        tile_classes: int8 ``[B, cdiv(S, class_block)]`` from :func:`key_tile_classes` (None without key padding), and
        class_block: its granularity; the output kernel reads both.
        launch: the warps and stages the search ran with (empty on the interpreter). The output kernel runs with
            the same ones, so that both compute the same fp32 scores (``tl.dot`` at another warp count may sum
            ``D`` in another order; the argmax test ``x = m`` and the bitmask's argument need equal scores).
    """

    row_max: torch.Tensor
    margin: torch.Tensor
    passes: torch.Tensor
    live: torch.Tensor
    block_m: int
    block_n: int
    tile_classes: torch.Tensor | None
    class_block: int
    launch: dict[str, int]


#: the threshold kernel autotuned (CUDA only): blocks, warps and stages per (head dim, dtypes, causal, padding, S)
_threshold_kernel_tuned = triton.autotune(
    configs=tuning.threshold_configs(),
    key=["HEAD_DIM", "CAUSAL", "HAS_PAD", "s_bucket"],
    prune_configs_by={"early_config_prune": tuning.prune_threshold_configs},
    cache_results=True,
)(_threshold_kernel)


def r_softmax_threshold(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding: torch.Tensor | None,
    rate: torch.Tensor,
    causal: bool,
    scale: float,
    eps: float,
    block_m: int | None = None,
    block_n: int | None = None,
) -> Threshold:
    """Row maximum and margin of r-softmax attention, without the ``[T, S]`` scores.

    Args:
        q: ``[B, H, T, D]``; k: ``[B, H, S, D]``, same dtype (fp16/bf16/fp32), last dim contiguous.
        key_padding: bool ``[B, S]`` (True = valid key; may be a stride-0 broadcast) or None.
        rate: fp32 ``[H]`` on the device, in ``[0, 1]``.
        causal: query ``i`` sees key ``j`` iff ``j <= i + S - T``.
        scale: score multiplier; eps: the r-softmax margin epsilon.
        block_m, block_n: the tile; on CUDA, both None autotunes it (with warps and stages, keyed on head dim, dtype,
            causality, padding and ``S`` rounded up to a power of 2; see :mod:`hf_sparse_attn.kernels.tuning`),
            otherwise a None takes :func:`~hf_sparse_attn.kernels.tuning.default_blocks`.

    Returns:
        A :class:`Threshold`: ``m`` and ``t`` equal to :func:`hf_sparse_attn.ops.r_softmax_margin` on the exact scores
        (``m = 0``, ``t = eps`` for rows without a valid key; NaN for rows with a NaN score), the passes per row
        block, the live-tile bitmask and the tile it refers to.

    Examples::
        >>> q = k = torch.randn(1, 2, 16, 16)  # doctest: +SKIP (needs CUDA or TRITON_INTERPRET=1)
        >>> found = r_softmax_threshold(q, k, None, torch.tensor([0.5, 0.9]), False, 0.25, 1e-8)
        >>> found.margin.shape, found.live.shape
        (torch.Size([1, 2, 16]), torch.Size([1, 2, 1, 1]))
    """
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    tuned = tuning.autotuned(q, block_m, block_n)
    if tuned:  # buffers for the smallest candidate tile; the chosen one uses a prefix
        meta = {}
        rows_m, rows_n = min(tuning.BLOCK_M_CANDIDATES), min(tuning.BLOCK_N_CANDIDATES)
    else:
        default_m, default_n = tuning.default_blocks(head_dim, q.is_cuda)
        rows_m, rows_n = block_m or default_m, block_n or default_n
        meta = {"BLOCK_M": rows_m, "BLOCK_N": rows_n}
    row_max = torch.empty(batch, heads, t_len, dtype=torch.float32, device=q.device)
    margin = torch.empty_like(row_max)
    passes = torch.empty(batch * heads * triton.cdiv(t_len, rows_m), dtype=torch.int32, device=q.device)
    live = torch.empty(passes.numel() * triton.cdiv(s_len, rows_n), dtype=torch.uint8, device=q.device)
    classes = None if key_padding is None else key_tile_classes(key_padding, rows_n)
    guess = threshold_guess(q, k, key_padding, rate, scale)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    kernel = _threshold_kernel_tuned if tuned else _threshold_kernel
    kernel[lambda meta: (triton.cdiv(t_len, meta["BLOCK_M"]), batch * heads)](
        q, k, pad, q if classes is None else classes, rate, guess, row_max, margin, passes, live,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        stride_pb, stride_pn, 0 if classes is None else classes.stride(0),
        heads, t_len, s_len, s_len - t_len, scale, eps, tuning.s_bucket(s_len),
        HEAD_DIM=head_dim, CLASS_BLOCK=rows_n, CAUSAL=causal, HAS_PAD=key_padding is not None,
        NUM_BUCKETS=NUM_BUCKETS, ZOOM=ZOOM, MAX_PASSES=MAX_PASSES, **kernel_options(q), **meta,
        **launch_options(q, tuned),
    )  # fmt: skip
    if tuned:  # the configuration this call ran (a host-side choice: no sync)
        config = kernel.best_config
        block_m, block_n = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N"))
        launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    else:
        block_m, block_n = rows_m, rows_n
        launch = dict(tuning.DEFAULT_LAUNCH) if q.is_cuda else {}
    row_blocks, key_blocks = triton.cdiv(t_len, block_m), triton.cdiv(s_len, block_n)
    return Threshold(
        row_max=row_max,
        margin=margin,
        passes=passes[: batch * heads * row_blocks].view(batch * heads, row_blocks),
        live=live[: batch * heads * row_blocks * key_blocks].view(batch, heads, row_blocks, key_blocks),
        block_m=block_m,
        block_n=block_n,
        tile_classes=classes,
        class_block=rows_n,
        launch=launch,
    )
