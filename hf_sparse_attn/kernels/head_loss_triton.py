"""Triton row kernel of the fused LM-head loss: each row's cross-entropy and its gradient, in place.

The twin of :func:`hf_sparse_attn.ops.head_loss.row_loss_and_grad` (the specification), which states the maths.
One program per row of the `[C, V]` chunk of logits, two passes over the row in blocks of ``BLOCK_V``:

1. an online log-sum-exp of the scores u (u = z, or u = 2z - softplus(z) for sigsoftmax), their sum (for label
   smoothing) and the label's score give the row's loss;
2. the row is overwritten with ``w (softmax(u) - q)`` (times ``2 - sigmoid(z)`` for sigsoftmax).

No `[C, V]` temporary is allocated, where the reference needs two or three. The chunking, the matmuls and the
gradient accumulation stay in :mod:`hf_sparse_attn.ops.head_loss`; the dispatcher is
:mod:`hf_sparse_attn.kernels.head_loss_dispatch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_row_loss_and_grad"]

BLOCK_V = 1024


@triton.jit
def _scores(z, SIGSOFTMAX: tl.constexpr):
    if SIGSOFTMAX:  # 2z - softplus(z), softplus(z) = max(z, 0) + log(1 + exp(-|z|))
        return 2.0 * z - (tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z))))
    return z


@triton.jit
def _row_loss_grad_kernel(
    scores_ptr,
    labels_ptr,
    weights_ptr,
    loss_ptr,
    row_stride,
    vocab,
    smoothing,
    SIGSOFTMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = scores_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    weight = tl.load(weights_ptr + row)
    # pass 1: running max m, running sum of exp(u - m), sum of u
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    u_sum = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        u = _scores(tl.load(base + cols, mask=inside, other=0.0).to(tl.float32), SIGSOFTMAX)
        u_sum += tl.sum(tl.where(inside, u, 0.0))
        u = tl.where(inside, u, float("-inf"))
        m_new = tl.maximum(m, tl.max(u))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new))
        m = m_new
    lse = m + tl.log(total)
    u_label = _scores(tl.load(base + label).to(tl.float32), SIGSOFTMAX)
    loss = lse - (1.0 - smoothing) * u_label - smoothing / vocab * u_sum
    tl.store(loss_ptr + row, loss * weight)
    # pass 2: the gradient, in place
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < vocab
        z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.exp(_scores(z, SIGSOFTMAX) - lse) - smoothing / vocab
        grad = tl.where(cols == label, grad - (1.0 - smoothing), grad) * weight
        if SIGSOFTMAX:
            grad = grad * (2.0 - tl.sigmoid(z))
        tl.store(base + cols, grad, mask=inside)


def triton_row_loss_and_grad(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, label_smoothing: float, sigsoftmax: bool
) -> torch.Tensor:
    """:func:`hf_sparse_attn.ops.head_loss.row_loss_and_grad` by the Triton kernel (float32 scores, rows
    contiguous). Returns the weighted loss rows `[C]` and overwrites ``scores`` with the gradient."""
    if scores.dtype != torch.float32 or scores.stride(1) != 1:
        raise ValueError(f"the row kernel needs float32 scores with contiguous rows; got {scores.dtype}")
    num_rows, vocab = scores.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=scores.device)
    if num_rows:
        _row_loss_grad_kernel[(num_rows,)](
            scores,
            labels.contiguous(),
            weights.to(torch.float32).contiguous(),
            loss,
            scores.stride(0),
            vocab,
            float(label_smoothing),
            SIGSOFTMAX=bool(sigsoftmax),
            BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)),
        )
    return loss
