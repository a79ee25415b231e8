"""Mixtures of softmaxes (MoS) and of sigsoftmaxes (MoSS), mixed in probability space.

Yang, Dai, Salakhutdinov, Cohen. *Breaking the Softmax Bottleneck: A High-Rank RNN Language Model.* ICLR 2018
(arXiv:1711.03953); MoSS: Kanai et al., NeurIPS 2018 (arXiv:1805.10829).

    P(y | h) = sum_k pi_k(h) * f(W a_k + b)_y,        f = softmax (MoS) or sigsoftmax (MoSS),

with mixture weights pi(h) (a softmax over K components) and one feature vector a_k per component. In log space,
log P = logsumexp_k (log pi_k + log f_k).

:func:`log_mixture` is the reference: it takes all K component log-probabilities `[..., K, V]` at once.
:func:`log_mixture_linear` computes the same thing from the features without ever holding K `[tokens x V]` tensors:
it walks over token chunks and, inside a chunk, over components, folding each one into a running ``logaddexp``.
Its backward pass recomputes each chunk's component logits (like activation checkpointing) and weights the upstream
gradient by the posterior responsibility r_k = pi_k f_k / P, so training keeps only the output `[tokens x V]`
for the backward pass, whatever K is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_sparse_attn.ops.sigsoftmax import log_sigsoftmax

__all__ = ["LOG_NORMALIZERS", "log_mixture", "log_mixture_linear"]


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, dim=-1)


#: component distribution f of each mixture kind, as a log-normaliser over the last dimension
LOG_NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": _log_softmax,
    "sigsoftmax": log_sigsoftmax,
}

#: elements of one `[chunk x V]` temporary (64 MiB in float32); sets the default token chunk
CHUNK_ELEMENTS = 2**24


def log_mixture(log_prior: torch.Tensor, component_log_probs: torch.Tensor) -> torch.Tensor:
    r"""log sum_k exp(log_prior_k + component_log_probs_k): the log of a mixture of K distributions.

    Args:
        log_prior (`torch.Tensor`): `[..., K]` log mixture weights (log pi; ``exp`` sums to 1 over K).
        component_log_probs (`torch.Tensor`): `[..., K, V]` log-probabilities of each component.

    Returns:
        `torch.Tensor` `[..., V]`: log-probabilities of the mixture.

    Examples::

        >>> log_prior = torch.log(torch.tensor([0.25, 0.75]))
        >>> components = torch.log(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        >>> log_mixture(log_prior, components).exp()
        tensor([0.6250, 0.3750])
    """
    return torch.logsumexp(log_prior.unsqueeze(-1) + component_log_probs, dim=-2)


class _Logits:
    """The component logits W a + b of one `[C, D]` chunk: the matmul in ``matmul_dtype`` (the model's dtype, or the
    autocast dtype), the result in ``dtype`` (float32/64) for the normaliser. Forward and backward use the same
    casts, so the backward's recomputed logits are bit-identical to the forward's, with or without autocast."""

    def __init__(self, weight, bias, matmul_dtype, dtype):
        self.weight = weight.to(matmul_dtype)  # [V, D]; a copy only when autocast changes the dtype
        self.bias = None if bias is None else bias.to(matmul_dtype)
        self.matmul_dtype, self.dtype = matmul_dtype, dtype

    def __call__(self, features):
        with torch.autocast(features.device.type, enabled=False):
            return F.linear(features.to(self.matmul_dtype), self.weight, self.bias).to(self.dtype)  # [C, V]


class _StreamingMixture(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_prior, features, weight, bias, component, chunk_size, matmul_dtype):
        num_tokens, num_components, _ = features.shape
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        log_normalizer = LOG_NORMALIZERS[component]
        logits = _Logits(weight, bias, matmul_dtype, dtype)
        out = features.new_empty(num_tokens, weight.shape[0], dtype=dtype)  # [N, V]
        for start in range(0, num_tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            acc = out[rows]  # [C, V] view: the running log-sum
            for k in range(num_components):
                term = log_normalizer(logits(features[rows, k]))
                term += log_prior[rows, k, None].to(dtype)
                if k == 0:
                    acc.copy_(term)
                else:
                    torch.logaddexp(acc, term, out=acc)
        ctx.save_for_backward(log_prior, features, weight, bias, out)
        ctx.component, ctx.chunk_size, ctx.matmul_dtype = component, chunk_size, matmul_dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        log_prior, features, weight, bias, out = ctx.saved_tensors
        log_normalizer = LOG_NORMALIZERS[ctx.component]
        dtype = out.dtype
        logits = _Logits(weight, bias, ctx.matmul_dtype, dtype)
        weight_c = weight.to(dtype)  # [V, D]
        grad_prior = torch.zeros_like(log_prior, dtype=dtype)  # [N, K]
        grad_features = torch.zeros_like(features, dtype=dtype)  # [N, K, D]
        grad_weight = torch.zeros_like(weight, dtype=dtype)  # [V, D]
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=dtype)  # [V]
        for start in range(0, out.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            for k in range(features.shape[1]):
                feats = features[rows, k]  # [C, D]
                with torch.enable_grad():
                    z = logits(feats).requires_grad_()  # [C, V]
                    log_f = log_normalizer(z)
                # d out / d term_k = responsibility r_k = exp(term_k - out), with term_k = log pi_k + log f_k
                grad_term = (log_f.detach() + log_prior[rows, k, None].to(dtype) - out[rows]).exp_()
                grad_term *= grad_out[rows]
                grad_prior[rows, k] = grad_term.sum(-1)
                (grad_z,) = torch.autograd.grad(log_f, z, grad_term)  # [C, V]
                grad_features[rows, k] = grad_z @ weight_c
                grad_weight.addmm_(grad_z.T, feats.to(dtype))
                if grad_bias is not None:
                    grad_bias += grad_z.sum(0)
        return (
            grad_prior.to(log_prior.dtype),
            grad_features.to(features.dtype),
            grad_weight.to(weight.dtype),
            None if bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
        )


def log_mixture_linear(
    log_prior: torch.Tensor,
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    component: str = "softmax",
    chunk_size: int | None = None,
) -> torch.Tensor:
    r"""log sum_k pi_k * f(features_k W^T + b): a mixture of K softmaxes / sigsoftmaxes over a shared output layer,
    computed in token chunks without materialising K `[N x V]` tensors.

    Equal to ``log_mixture(log_prior, f(features @ W.T + b))`` (the reference), forward and backward. The matmuls
    run in the weight's dtype (or the autocast dtype under ``torch.autocast``); the normaliser, the mixture and the
    result are float32 (float64 for float64 weights), since log-probabilities need the precision.
    Peak memory: the output plus a few `[chunk_size x V]` temporaries; the backward pass saves only the inputs and
    the output.

    Args:
        log_prior (`torch.Tensor`): `[N, K]` log mixture weights log pi.
        features (`torch.Tensor`): `[N, K, D]` per-component features a_k (e.g. tanh(P_k h)).
        weight (`torch.Tensor`): `[V, D]` shared output embedding W.
        bias (`torch.Tensor`, *optional*): `[V]` output bias b.
        component (`str`, *optional*, defaults to ``"softmax"``): f, one of ``"softmax"`` (MoS) or
            ``"sigsoftmax"`` (MoSS).
        chunk_size (`int`, *optional*): tokens per chunk; default keeps one `[chunk x V]` temporary near
            2**24 elements.

    Returns:
        `torch.Tensor` `[N, V]`: log-probabilities of the mixture.

    Examples::

        >>> N, K, D, V = 5, 3, 8, 11
        >>> log_prior = torch.randn(N, K).log_softmax(-1)
        >>> features, weight = torch.randn(N, K, D), torch.randn(V, D)
        >>> log_p = log_mixture_linear(log_prior, features, weight, component="sigsoftmax", chunk_size=2)
        >>> log_p.shape, bool(torch.allclose(log_p.logsumexp(-1), torch.zeros(N), atol=1e-5))
        (torch.Size([5, 11]), True)
    """
    if component not in LOG_NORMALIZERS:
        raise ValueError(f"component must be one of {sorted(LOG_NORMALIZERS)}; got {component!r}")
    if features.dim() != 3 or log_prior.shape != features.shape[:2]:
        raise ValueError(
            f"features must be [N, K, D] and log_prior [N, K]; got {tuple(features.shape)} and {tuple(log_prior.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != features.shape[2]:
        raise ValueError(f"weight must be [V, D] with D = {features.shape[2]}; got {tuple(weight.shape)}")
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size}")
    device_type = weight.device.type
    autocast = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    return _StreamingMixture.apply(log_prior, features, weight, bias, component, chunk_size, matmul_dtype)
