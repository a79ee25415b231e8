"""A learnable, strictly increasing, piecewise-linear pointwise transform of logits (PLIF).

Ganea, Gelly, Bécigneul, Severyn. *Breaking the Softmax Bottleneck via Learnable Monotonic Pointwise
Non-linearities.* ICML 2019 (arXiv:1902.08077).

K knots x_j = -T + j * delta (j = 0..K-1, delta = 2T / (K - 1)) split [-T, T] into K - 1 segments; segment j has the
slope s_j = softplus(theta_j + log(e - 1)) > 0, so theta = 0 gives slope 1. With f(-T) = -T,

    f(z) = -T + sum_j s_j * clamp(z - x_j, 0, delta)          for z in [-T, T],

extended linearly outside [-T, T] with the edge slopes s_0 (left) and s_{K-2} (right). f is strictly increasing, so
it keeps the order of the logits while reshaping their gaps. theta = 0 makes f the identity, exactly in any dtype,
and weight decay on theta pulls f towards the identity.

Evaluation is a table look-up, O(1) per logit: with i = clamp(floor((z + T) / delta), 0, K - 2),

    f(z) = s_i * z + a_i,    a_i = x_i * (1 - s_i) + delta * sum_{j<i} (s_j - 1),

where a is a cumulative sum over the K - 1 slopes (a = 0 at the identity, so the identity is exact). The look-up
runs in chunks of logits, so its integer indices never take a `[tokens x V]` buffer, and the backward pass saves
only z (4 bytes per logit) and recomputes i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SLOPE_OFFSET", "monotonic_transform", "segment_table"]

#: logits per look-up chunk (the int64 segment indices of one chunk take 32 MiB)
CHUNK_ELEMENTS = 2**22

#: log(e - 1): slope = softplus(theta + SLOPE_OFFSET), so theta = 0 means slope 1 (the identity).
SLOPE_OFFSET: float = math.log(math.expm1(1.0))


def _segment_index(z: torch.Tensor, knot_range: float, num_segments: int) -> torch.Tensor:
    # In place on a fresh tensor: z is [tokens x V], so every extra temporary costs a logits-sized buffer.
    delta = 2.0 * knot_range / num_segments
    u = torch.add(z, knot_range).div_(delta).floor_().clamp_(0, num_segments - 1)
    return u.nan_to_num_(nan=0.0).long()  # a NaN logit stays NaN in the output instead of breaking the gather


def _chunks(num_elements: int) -> list[slice]:
    return [slice(start, start + CHUNK_ELEMENTS) for start in range(0, num_elements, CHUNK_ELEMENTS)]


class _PiecewiseLinear(torch.autograd.Function):
    """y = slopes[i(z)] * z + intercepts[i(z)] for a flat z `[M]`; the backward recomputes the segment index i(z)."""

    @staticmethod
    def forward(ctx, z, slopes, intercepts, knot_range):
        y = torch.empty_like(z)  # [M]
        for part in _chunks(z.numel()):
            index = _segment_index(z[part], knot_range, slopes.numel())  # [C]
            torch.addcmul(intercepts[index], slopes[index], z[part], out=y[part])
        ctx.save_for_backward(z, slopes)
        ctx.knot_range = knot_range
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, slopes = ctx.saved_tensors
        grad = grad.contiguous()
        grad_z = torch.empty_like(z) if ctx.needs_input_grad[0] else None  # [M]
        grad_slopes, grad_intercepts = torch.zeros_like(slopes), torch.zeros_like(slopes)  # [K-1]
        for part in _chunks(z.numel()):
            index = _segment_index(z[part], ctx.knot_range, slopes.numel())  # [C]
            if grad_z is not None:
                torch.mul(grad[part], slopes[index], out=grad_z[part])
            # dy/ds_i = z and dy/da_i = 1 on the logits that fall in segment i
            grad_slopes.index_add_(0, index, grad[part] * z[part])
            grad_intercepts.index_add_(0, index, grad[part])
        return grad_z, grad_slopes, grad_intercepts, None


def segment_table(theta: torch.Tensor, knot_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The look-up table of f (module docstring): slopes s_i and intercepts a_i of the K - 1 segments, so that
    f(z) = s_i * z + a_i with i = clamp(floor((z + T) / delta), 0, K - 2). Differentiable in ``theta``.

    Args:
        theta (`torch.Tensor`): `[K - 1]` raw slopes (float32/64).
        knot_range (`float`): T > 0.

    Returns:
        `(slopes [K - 1], intercepts [K - 1])` in the dtype of ``theta``.
    """
    num_segments = theta.numel()
    delta = 2.0 * knot_range / num_segments
    slopes = F.softplus(theta + SLOPE_OFFSET)  # [K-1]
    left_knots = -knot_range + delta * torch.arange(num_segments, dtype=theta.dtype, device=theta.device)
    excess = delta * torch.cumsum(slopes - 1.0, dim=0)  # [K-1]; f(x_i) - x_i = excess[i-1]
    intercepts = left_knots * (1.0 - slopes) + F.pad(excess[:-1], (1, 0))  # [K-1]
    return slopes, intercepts


def monotonic_transform(z: torch.Tensor, theta: torch.Tensor, knot_range: float) -> torch.Tensor:
    r"""Apply the strictly increasing piecewise-linear map f (module docstring) to every entry of ``z``.

    Half-precision inputs are computed in float32 and cast back to ``z.dtype``.

    Args:
        z (`torch.Tensor`): logits of any shape, e.g. `[B, T, V]`.
        theta (`torch.Tensor`): `[K - 1]` raw slopes of the K - 1 segments between K knots:
            slope = softplus(theta + log(e - 1)); zeros give the identity.
        knot_range (`float`): T > 0; the knots lie on a uniform grid over [-T, T].

    Returns:
        `torch.Tensor` of the shape and dtype of ``z``: f(z).

    Examples::

        >>> theta = torch.zeros(999)  # K = 1000 knots, identity
        >>> z = torch.tensor([-30.0, 0.5, 25.0])
        >>> monotonic_transform(z, theta, knot_range=20.0)
        tensor([-30.0000,   0.5000,  25.0000])
        >>> theta = torch.tensor([0.0, math.log(math.expm1(2.0)) - SLOPE_OFFSET])  # K = 3: slopes 1 then 2
        >>> monotonic_transform(torch.tensor([-2.0, 0.0, 1.0, 3.0]), theta, knot_range=1.0)
        tensor([-2.,  0.,  2.,  6.])
    """
    if not knot_range > 0:
        raise ValueError(f"knot_range must be > 0, got {knot_range!r}")
    if theta.dim() != 1 or theta.numel() < 1:
        raise ValueError(f"theta must be 1-D with num_knots - 1 >= 1 entries, got shape {tuple(theta.shape)}")
    compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    slopes, intercepts = segment_table(theta.to(compute_dtype), knot_range)
    zf = z.to(compute_dtype)
    y = _PiecewiseLinear.apply(zf.reshape(-1), slopes, intercepts, float(knot_range))  # [numel]
    return y.view(z.shape).to(z.dtype)
