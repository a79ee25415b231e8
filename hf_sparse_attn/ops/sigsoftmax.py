"""sigsoftmax: softmax times a sigmoid, an output normaliser that escapes the softmax bottleneck.

Kanai, Fujiwara, Yamanaka, Adachi. *Sigsoftmax: Reanalysis of the Softmax Bottleneck.* NeurIPS 2018
(arXiv:1805.10829).

    sigsoftmax(z)_i = exp(z_i) * sigmoid(z_i) / sum_j exp(z_j) * sigmoid(z_j)

In log space, with g(z) = z + log sigmoid(z) = 2z - softplus(z),

    log sigsoftmax(z)_i = g(z_i) - logsumexp_j g(z_j).

Unlike softmax, sigsoftmax is **not** shift-invariant (sigmoid(z + c) != sigmoid(z)), so z must never be max-shifted;
the numerical shift happens on g, inside ``logsumexp``. ``softplus`` switches to the identity for large z and
``logsumexp`` subtracts its own maximum, so logits of any size (1e4 or -1e4 included) give finite results.

The backward pass is hand-derived so that only z and the output are kept (not g and the softplus): with
p = exp(log sigsoftmax(z)) and upstream gradient G,

    dz = (G - p * sum(G)) * (2 - sigmoid(z)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["log_sigsoftmax", "sigsoftmax"]


def _upcast(z: torch.Tensor) -> torch.Tensor:
    # fp16 overflows at 65504 and bf16 keeps 8 mantissa bits: the normaliser runs in float32.
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


class _LogSigsoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, dim):
        g = F.softplus(z).neg_().add_(z, alpha=2.0)  # 2z - softplus(z), one temporary
        out = torch.log_softmax(g, dim=dim)  # = g - logsumexp(g), shifted by max(g) inside
        ctx.save_for_backward(z, out)
        ctx.dim = dim
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, out = ctx.saved_tensors
        grad_g = out.exp().mul_(grad.sum(ctx.dim, keepdim=True)).neg_().add_(grad)  # G - p * sum(G)
        return grad_g.mul_(torch.sigmoid(z).neg_().add_(2.0)), None


def log_sigsoftmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Log of sigsoftmax along ``dim``: ``g(z) - logsumexp(g(z))`` with ``g(z) = 2z - softplus(z)``.

    Half-precision inputs are computed in float32 and the result is cast back to ``z.dtype``.

    Args:
        z (`torch.Tensor`): logits of any shape, e.g. `[B, T, V]`.
        dim (`int`, *optional*, defaults to -1): the dimension that is normalised.

    Returns:
        `torch.Tensor` of the shape and dtype of ``z``: log-probabilities; ``exp`` of it sums to 1 along ``dim``.

    Examples::

        >>> z = torch.tensor([2.0, 0.0, -2.0])
        >>> log_sigsoftmax(z).exp()
        tensor([0.9265, 0.0712, 0.0023])
        >>> torch.allclose(log_sigsoftmax(z + 1.0), log_sigsoftmax(z))  # not shift-invariant
        False
    """
    return _LogSigsoftmax.apply(_upcast(z), dim).to(z.dtype)


def sigsoftmax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""sigsoftmax along ``dim``: ``exp(z) * sigmoid(z) / sum(exp(z) * sigmoid(z))``, computed as
    ``exp(log_sigsoftmax(z))``.

    Args:
        z (`torch.Tensor`): logits of any shape, e.g. `[B, T, V]`.
        dim (`int`, *optional*, defaults to -1): the dimension that is normalised.

    Returns:
        `torch.Tensor` of the shape and dtype of ``z``: probabilities summing to 1 along ``dim``.

    Examples::

        >>> sigsoftmax(torch.tensor([[1e4, 0.0, -1e4]]))
        tensor([[1., 0., 0.]])
    """
    zf = _upcast(z)
    return log_sigsoftmax(zf, dim=dim).exp().to(z.dtype)
