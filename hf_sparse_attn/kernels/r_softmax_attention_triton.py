"""Flash-style r-softmax attention in Triton: forward and backward, never materialising the [T, S] scores.

Reference twin: ``hf_sparse_attn.ops.r_softmax(q @ k^T * scaling, rate, mask=valid) @ v`` (DESIGN §2 has the
maths, :mod:`hf_sparse_attn.ops.r_softmax` is the specification, ``docs/kernels.md`` has the design notes). Per
query row ``i`` with ``k`` valid keys, scores ``x_j = scaling q_i·k_j``, ``m`` their maximum and ``q_r`` their
r-quantile (linear interpolation between the order statistics at ranks ``floor(r (k-1))`` and ``ceil(r (k-1))``)::

    t = (m - q_r) + eps,   u_j = (x_j - m) + t,   a_j = relu(u_j) exp(x_j - m),   o_i = sum_j a_j v_j / sum_j a_j

Forward, per block of query rows (one program per kernel):

1. :func:`~hf_sparse_attn.kernels.r_softmax_threshold_triton.r_softmax_threshold`: ``m`` and ``t`` exactly, in a
   few passes over the keys (a 16-bucket histogram search; about 4 passes, the first also finding ``m``);
2. ``_output_kernel``, one pass: ``m`` is final, so the weighted sum needs no running-max rescaling; weights are
   accumulated as ``a / t`` in [0, 1] (fp16-safe) with ``exp2`` and one reciprocal of ``t`` and of the sum per row;
   key blocks without a surviving entry skip ``P V``; the argmax (first index of ``m``) is found here. Attention
   dropout, when asked for, scales the weights by ``keep / (1 - p)`` from a counter-based mask
   (:func:`dropout_keep_mask` draws the same one). A NaN score gives a NaN row.

Backward (FlashAttention-2 layout, scores recomputed blockwise), with ``g_j = dO_i·v_j``, ``c_j = 1[u_j > 0]``,
``e_j = exp(x_j - m)``, ``Z = sum_j a_j``, ``delta_i = <g, p> = dO_i·O_i`` and the argmax ``M``::

    dx_j = (c_j + relu(u_j)) e_j (g_j - delta) / Z - 1[j = M] rho,   rho = sum_j c_j e_j (g_j - delta) / Z

A row-parallel kernel computes ``dq``, ``delta`` and ``rho`` (the argmax share of ``dq`` is added at the end, in
fp32, with one gathered key row); a key-parallel kernel then computes ``dk`` and ``dv``, and adds the argmax share
``-rho_i q_i`` of ``dk`` as an fp32 epilogue (never rounded to the input dtype). Both drop the argmax column's own
``c_M e_M`` from ``b_M`` and from ``rho``, where the two cancel exactly (see ``_bwd_tile``), and multiply by a
per-row ``1 / Z``. With dropout, ``g_j`` carries the same mask. Forward saves per row ``m``, ``t``, ``Z`` and the
argmax index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import FunctionCtx, once_differentiable

from hf_sparse_attn.kernels.r_softmax_threshold_triton import (
    _dot,
    _key_mask,
    _padding_args,
    _rows,
    _store_rows,
    _tile_scores,
    kernel_options,
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
):
    """``o = sum_j a_j d_j v_j / sum_j a_j`` for the threshold of ``_threshold_kernel`` (``d`` = dropout scale),
    the normaliser ``Z`` and the argmax (first index of the max, as ``torch.max``), in one pass over the keys.

    ``m`` is final, so no running-max rescaling; the weights are accumulated as ``a_j / t`` in ``[0, 1]`` (the
    argmax has ``a = t``), fp16-safe, with one reciprocal of ``t`` and one of the sum per row and ``exp2``."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    Q += i_b * stride_qb + i_h * stride_qh
    K += i_b * stride_kb + i_h * stride_kh
    V += i_b * stride_vb + i_h * stride_vh
    OUT += i_b * stride_ob + i_h * stride_oh
    PAD += i_b * stride_pb
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
        o_n = i_n + tl.arange(0, BLOCK_N)
        b_k = _rows(K, o_n, S, stride_kn, HEAD_DIM)
        m_key = _key_mask(PAD, o_n, S, stride_pn, HAS_PAD)
        b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
        b_shift = b_s - b_max[:, None]
        b_u = b_shift + b_t[:, None]
        m_alive = m_valid & (b_u > 0)
        if tl.max(m_alive.to(tl.int32)) > 0:  # skip P V for blocks below every row's threshold
            b_arg = tl.minimum(b_arg, tl.min(tl.where(m_valid & (b_shift == 0.0), o_n[None, :], 2147483647), 1))
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
    m_key,
    o_m,
    o_n,
    b_max,
    b_t,
    b_inv_z,
    b_delta,
    b_arg,
    i_bh,
    T,
    S,
    offset,
    scale,
    seed,
    p_drop,
    CAUSAL: tl.constexpr,
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
    computed when some entry of the tile survives the threshold."""
    b_s, m_valid = _tile_scores(b_q, b_k, m_key, o_m, o_n, T, offset, scale, CAUSAL, DOT_PRECISION, UPCAST)
    b_shift = b_s - b_max[:, None]
    b_u = b_shift + b_t[:, None]
    m_alive = m_valid & (b_u > 0)
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
    b_inv_z = 1.0 / tl.load(STAT_Z + o_stat, mask=m_m, other=1.0)
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
            b_inv_z,
            b_delta,
            b_arg,
            i_bh,
            T,
            S,
            offset,
            scale,
            seed,
            p_drop,
            CAUSAL,
            DOT_PRECISION,
            UPCAST,
            DROPOUT,
        )
        if any_alive:
            b_rho += tl.sum(b_rho_terms, 1)
            b_dq += _dot(b_ds.to(b_k.dtype), b_k, DOT_PRECISION, UPCAST)
    # the threshold moves with the maximum: dx_M -= rho, i.e. dq -= rho k_M
    b_dq -= b_rho[:, None] * _rows(K, tl.where(m_m, b_arg, S), S, stride_kn, HEAD_DIM).to(tl.float32)
    b_dq = tl.where((b_max == b_max)[:, None], b_dq, float("nan"))  # a row with a NaN score
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
        b_inv_z = 1.0 / tl.load(STAT_Z + o_stat, mask=m_m, other=1.0)
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
            b_inv_z,
            b_delta,
            b_arg,
            i_bh,
            T,
            S,
            offset,
            scale,
            seed,
            p_drop,
            CAUSAL,
            DOT_PRECISION,
            UPCAST,
            DROPOUT,
        )
        if any_alive:
            b_dv += _dot(tl.trans(b_p.to(b_do.dtype)), b_do, DOT_PRECISION, UPCAST)
            b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, DOT_PRECISION, UPCAST)
        # the argmax share -rho_i q_i of the rows whose argmax is one of these keys, in fp32 (never rounded to the
        # input dtype: rho grows like 1 / Z)
        m_arg = (b_arg >= i_n * BLOCK_N) & (b_arg < i_n * BLOCK_N + BLOCK_N)
        if tl.max(m_arg.to(tl.int32)) > 0:
            b_rho = tl.load(STAT_RHO + o_stat, mask=m_m, other=0.0)
            b_hit = (o_n[None, :] == b_arg[:, None]).to(tl.float32)  # (BLOCK_M, BLOCK_N) one-hot rows
            b_dk -= tl.dot(tl.trans(b_hit), b_rho[:, None] * b_q.to(tl.float32), input_precision="ieee")
    _store_rows(DK, o_n, S, stride_dkn, b_dk * scale, HEAD_DIM)
    _store_rows(DV, o_n, S, stride_dvn, b_dv, HEAD_DIM)


# fmt: on


def _blocks(q: torch.Tensor, block_m: int | None, block_n: int | None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)``: untuned GPU defaults (see docs/kernels.md); 64 x 64 on the interpreter, whose cost
    grows with the number of operations rather than their size."""
    return block_m or 64, block_n or (64 if not q.is_cuda or q.shape[-1] <= 64 else 32)


def _launch_options(q: torch.Tensor) -> dict:
    return {"num_warps": 4, "num_stages": 2} if q.is_cuda else {}


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
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Launch the forward: the threshold kernel (a few passes over the keys), then the output kernel (one).

    Args:
        q: ``[B, H, T, D]``; k, v: ``[B, H, S, D]``, same dtype (fp16/bf16/fp32), last dim contiguous.
        key_padding: bool ``[B, S]`` (True = valid key; may be a stride-0 broadcast) or None.
        rate: fp32 ``[H]`` on the device.
        causal: query ``i`` sees key ``j`` iff ``j <= i + S - T`` (queries aligned to the end, as under a KV cache).
        dropout, seed: attention-dropout probability in ``[0, 1)`` on the probabilities, and the seed of its
            counter-based mask (:func:`dropout_keep_mask`).

    Returns:
        ``(o [B, T, H, D], (m, t, z, argmax))`` with per-row stats ``[B, H, T]`` saved for the backward.
    """
    batch, heads, t_len, head_dim = q.shape
    s_len = k.shape[2]
    block_m, block_n = _blocks(q, block_m, block_n)
    row_max, margin, _ = r_softmax_threshold(q, k, key_padding, rate, causal, scale, eps, block_m, block_n)
    out = torch.empty(batch, t_len, heads, head_dim, dtype=q.dtype, device=q.device)  # (B, T, H, D)
    total = torch.empty_like(row_max)
    argmax = torch.empty(batch, heads, t_len, dtype=torch.int32, device=q.device)
    pad, stride_pb, stride_pn = _padding_args(key_padding, q)
    grid = (triton.cdiv(t_len, block_m), batch * heads)
    _output_kernel[grid](
        q, k, v, pad, out, row_max, margin, total, argmax,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, seed, dropout,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_PAD=key_padding is not None,
        DROPOUT=dropout > 0, **kernel_options(q), **_launch_options(q),
    )  # fmt: skip
    return out, (row_max, margin, total, argmax)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: ``do``/``out`` ``[B, T, H, D]``, the rest as in :func:`r_softmax_attention_fwd`
    (the same ``dropout`` and ``seed``). Deterministic: no atomics.

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
    block_m, block_n = _blocks(q, block_m, block_n)
    common = dict(
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_PAD=key_padding is not None,
        DROPOUT=dropout > 0, **kernel_options(q), **_launch_options(q),
    )  # fmt: skip
    _bwd_dq_kernel[(triton.cdiv(t_len, block_m), batch * heads)](
        q, k, v, pad, out, do, dq, stat_m, stat_t, stat_z, argmax, delta, rho,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        do.stride(0), do.stride(2), do.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, seed, dropout, **common,
    )  # fmt: skip
    _bwd_dkdv_kernel[(triton.cdiv(s_len, block_n), batch * heads)](
        q, k, v, pad, do, dk, dv, stat_m, stat_t, stat_z, argmax, delta, rho,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(2), do.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        stride_pb, stride_pn,
        heads, t_len, s_len, s_len - t_len, scale, seed, dropout, **common,
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
        out, stats = r_softmax_attention_fwd(
            q, k, v, key_padding, rate, causal, scale, eps, block_m, block_n, dropout=dropout, seed=seed
        )
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
            dropout=ctx.dropout, seed=ctx.seed,
        )  # fmt: skip
        return dq, dk, dv, None, None, None, None, None, None, None, None
