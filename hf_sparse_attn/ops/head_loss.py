"""Fused, chunked LM-head losses: from hidden states straight to the NLL, never holding a `[N x V]` tensor.

The reference (the specification) for every head of :mod:`hf_sparse_attn.heads`. For hidden states h `[N, D]`, the
output layer W `[V, D]` (+ b) and labels y `[N]`, the loss of token i is the cross-entropy against the smoothed
target q = (1 - eps) * onehot(y_i) + eps / V:

    L_i = -sum_v q_v log P(v | h_i) = -(1 - eps) log P(y_i | h_i) - (eps / V) sum_v log P(v | h_i),

summed (``reduction="sum"``) or averaged over the tokens whose label is not ``ignore_index`` (``"mean"``), exactly
``F.cross_entropy(log_probs, y, ignore_index=..., label_smoothing=eps, reduction=...)`` on the head's
log-probabilities. The heads, with z = W h + b:

=============  ==================================  ====================================================
head           log P(. | h)                        dL/dz for one token (u = pre-normaliser scores)
=============  ==================================  ====================================================
"softmax"      u - logsumexp(u),  u = z            p - q,                          p = softmax(u)
"sigsoftmax"   u = 2z - softplus(z)                (p - q) * (2 - sigmoid(z))
"plif"         u = f(z) = s_i z + a_i              (p - q) * s_i;  dL/ds_i += (p - q) z, dL/da_i += p - q
"mos"/"moss"   logsumexp_k(log pi_k + log f(z_k))  per component k, responsibility r_k = pi_k f_k / P:
                                                   G_k = -q r_k, dL/dlog pi_k = sum_v G_k,
                                                   dL/dz_k = (G_k - f_k sum_v G_k) * jac_k
=============  ==================================  ====================================================

(jac_k = 1 for MoS, 2 - sigmoid(z_k) for MoSS; i = i(z) is PLIF's segment of z, see
:mod:`hf_sparse_attn.ops.monotonic`.) The tokens are processed in chunks of C rows: each chunk's `[C, V]` logits
are computed, turned into the chunk's loss and dL/dz in place, and dL/dz is folded into dL/dh (rows of `[N, D]`),
dL/dW (`[V, D]`, float32) and the head parameters' gradients before the next chunk starts (Liger's fused linear
cross-entropy does the same for softmax). So the forward pass does the backward's work, backward only hands
over the stored gradients (scaled by the upstream scalar; once per forward), and peak memory is the gradients of the
inputs plus a few `[C, V]` buffers, independent of N (and of K for the mixtures, whose chunk shrinks as K grows).

PLIF's parameter gradients are sums over segments: each chunk's partial sums are added in chunk order, and within a
chunk on CUDA they come from a sort and a scan instead of ``index_add_``'s atomics, so the gradients are bit-for-bit
reproducible (``index_add_`` on CPU is sequential and deterministic).

The per-chunk row work of ``softmax``/``sigsoftmax``/``plif`` (:func:`row_loss_and_grad`) is what the Triton kernel
(:mod:`hf_sparse_attn.kernels.head_loss_triton`) replaces; :func:`hf_sparse_attn.kernels.fused_head_loss`
dispatches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_sparse_attn.ops.mixture import _Logits
from hf_sparse_attn.ops.monotonic import _segment_index, segment_table

__all__ = ["HEAD_LOSS_NAMES", "MixtureFeatures", "RowKernel", "head_loss", "row_loss_and_grad"]

#: every head the fused loss covers (the names of ``patch_model(head=...)``)
HEAD_LOSS_NAMES = ("softmax", "sigsoftmax", "plif", "mos", "moss")
REDUCTIONS = ("mean", "sum")
#: elements of the `[C, V]` buffers of one chunk (16 MiB each in float32); sets the default chunk size
CHUNK_ELEMENTS = 2**22

#: hidden `[C, D]` -> (log pi `[C, K]`, features a_k `[C, K, D]`); differentiable (e.g. ``MixtureHead.extra``)
MixtureFeatures = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: (scores `[C, V]`, labels `[C]`, weights `[C]`, label_smoothing, sigsoftmax) -> weighted loss rows `[C]`;
#: overwrites ``scores`` with the gradient (see :func:`row_loss_and_grad`)
RowKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, bool], torch.Tensor]


def row_loss_and_grad(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, label_smoothing: float, sigsoftmax: bool
) -> torch.Tensor:
    r"""Cross-entropy of each row of ``scores`` and its gradient, in place: the per-chunk work of the fused loss.

    With u = scores (or u = 2 z - softplus(z) for ``sigsoftmax``, z = scores), p = softmax(u) and
    q = (1 - eps) onehot(label) + eps / V, row i's loss is
    ``w_i * (logsumexp(u) - (1 - eps) u_label - eps * mean(u))`` and ``scores`` is overwritten with its gradient
    ``w_i * (p - q)`` (times ``2 - sigmoid(z)`` for sigsoftmax). A row with weight 0 gets loss and gradient 0.

    Args:
        scores (`torch.Tensor`): `[C, V]` float32/64 logits; overwritten with d loss / d scores.
        labels (`torch.Tensor`): `[C]` int64 labels in [0, V) (ignored rows: any valid index, weight 0).
        weights (`torch.Tensor`): `[C]` row weights, in the dtype of ``scores``.
        label_smoothing (`float`): eps in [0, 1].
        sigsoftmax (`bool`): scores are sigsoftmax logits z rather than softmax scores.

    Returns:
        `torch.Tensor` `[C]`: the weighted loss of each row.
    """
    vocab = scores.shape[1]
    if sigsoftmax:
        scores_u = F.softplus(scores).neg_().add_(scores, alpha=2.0)  # u = 2z - softplus(z)
        jacobian = scores  # z, turned into 2 - sigmoid(z) below
    else:
        scores_u, jacobian = scores, None
    lse = torch.logsumexp(scores_u, dim=1)  # [C]
    label_score = scores_u.gather(1, labels[:, None]).squeeze(1)  # [C]
    loss = lse - (1.0 - label_smoothing) * label_score
    if label_smoothing:
        loss -= label_smoothing / vocab * scores_u.sum(1)
    grad = scores_u.sub_(lse[:, None]).exp_()  # p
    if label_smoothing:
        grad.sub_(label_smoothing / vocab)
    grad.scatter_add_(1, labels[:, None], grad.new_full((labels.shape[0], 1), label_smoothing - 1.0))
    grad.mul_(weights[:, None])  # w (p - q)
    if jacobian is not None:
        grad.mul_(jacobian.sigmoid_().neg_().add_(2.0))
        scores.copy_(grad)
    return loss * weights


def _sorted_segment_sums(index: torch.Tensor, values: torch.Tensor, num_segments: int) -> torch.Tensor:
    """sum of ``values`` per ``index`` by a stable sort and a float64 scan: no atomics, the same bits every run."""
    order = index.argsort(stable=True)
    scan = F.pad(values[order].double().cumsum(0), (1, 0))  # [M + 1]
    ends = torch.bincount(index, minlength=num_segments).cumsum(0)  # integer counts: exact in any order
    return (scan[ends] - scan[F.pad(ends[:-1], (1, 0))]).to(values.dtype)


def _segment_sums(index: torch.Tensor, values: torch.Tensor, num_segments: int) -> torch.Tensor:
    """sum of ``values`` `[M]` per segment ``index`` `[M]` -> `[num_segments]`, deterministic on every device."""
    if values.is_cuda:
        return _sorted_segment_sums(index, values, num_segments)
    return values.new_zeros(num_segments).index_add_(0, index, values)  # sequential on CPU


@dataclass(frozen=True)
class _Spec:
    """Everything about one call that is not a tensor input."""

    head: str
    ignore_index: int
    label_smoothing: float
    reduction: str
    chunk_size: int
    matmul_dtype: torch.dtype
    knot_range: float | None
    mixture: MixtureFeatures | None
    rows: RowKernel


class _FusedHeadLoss(torch.autograd.Function):
    """loss = head NLL of (hidden, weight, bias, labels); params are PLIF's (slopes, intercepts) or the mixture's
    parameters. Forward computes the gradients chunk by chunk; backward scales them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, spec: _Spec, *params):
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        logits = _Logits(weight, bias, spec.matmul_dtype, dtype)
        weight_c = weight.to(dtype)  # [V, D]; dL/dh = dL/dz @ W
        valid = labels != spec.ignore_index  # [N]
        count = valid.sum()
        scale = 1.0 / count.clamp(min=1).to(dtype) if spec.reduction == "mean" else torch.ones((), dtype=dtype)
        weights = valid.to(dtype) * scale  # [N]
        safe_labels = torch.where(valid, labels, 0)  # [N]
        need_grads = any(ctx.needs_input_grad[:3]) or any(ctx.needs_input_grad[5:])
        grad_hidden = torch.zeros_like(hidden, dtype=dtype) if need_grads else None  # [N, D]
        grad_weight = torch.zeros_like(weight, dtype=dtype) if need_grads else None  # [V, D]
        grad_bias = torch.zeros_like(bias, dtype=dtype) if need_grads and bias is not None else None  # [V]
        chunks = range(0, hidden.shape[0], spec.chunk_size)
        grad_params = [torch.zeros_like(p, dtype=dtype) for p in params]  # summed in chunk order: deterministic
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        for start in chunks:
            rows = slice(start, start + spec.chunk_size)
            step = _mixture_chunk if spec.mixture is not None else _pointwise_chunk
            loss_rows, grad_h = step(
                spec, logits, hidden[rows], safe_labels[rows], weights[rows], weight_c, params,
                grad_weight, grad_bias, grad_params,
            )  # fmt: skip
            total += loss_rows.sum()
            if grad_hidden is not None:
                grad_hidden[rows] = grad_h
        if spec.reduction == "mean":  # the mean over zero tokens is NaN, as in F.cross_entropy
            total = torch.where(count > 0, total, torch.full_like(total, float("nan")))
        grads = (grad_hidden, grad_weight, grad_bias, *grad_params)
        inputs = (hidden, weight, bias, *params)
        # kept on ctx rather than saved, so that backward can hand them over without a copy (see backward)
        ctx.grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs, strict=True)]
        return total.float() if dtype != torch.float64 else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError(
                "the fused head loss computes its gradients in the forward pass and handed them over in the first "
                "backward pass; compute the loss again for another backward pass"
            )
        if bool(grad_loss == 1):  # loss.backward(): one host sync
            # the stored gradients are the answer; with no other reference left, autograd takes them as .grad
            # without a copy (dL/dW is the largest tensor here, `[V, D]`)
            ctx.grads = None
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in grads]
        return grads[0], grads[1], grads[2], None, None, *grads[3:]


def _pointwise_chunk(spec, logits, hidden, labels, weights, weight_c, params, grad_weight, grad_bias, grad_params):
    """softmax / sigsoftmax / plif on one chunk; returns (loss rows `[C]`, dL/dh `[C, D]` or None)."""
    z = logits(hidden)  # [C, V] in float32/64
    if spec.head == "plif":
        slopes, intercepts = params
        segment = _segment_index(z, spec.knot_range, slopes.numel())  # [C, V]
        scores = torch.addcmul(intercepts[segment], slopes[segment], z)  # u = f(z)
        loss_rows = spec.rows(scores, labels, weights, spec.label_smoothing, False)  # scores := dL/du
        if grad_weight is None:
            return loss_rows, None
        if grad_params:
            flat = segment.view(-1)
            grad_params[0] += _segment_sums(flat, (scores * z).view(-1), slopes.numel())
            grad_params[1] += _segment_sums(flat, scores.view(-1), slopes.numel())
        grad_z = scores.mul_(slopes[segment])
    else:
        loss_rows = spec.rows(z, labels, weights, spec.label_smoothing, spec.head == "sigsoftmax")
        if grad_weight is None:
            return loss_rows, None
        grad_z = z
    return loss_rows, _fold_linear(grad_z, hidden, weight_c, grad_weight, grad_bias)


def _fold_linear(grad_z, inputs, weight_c, grad_weight, grad_bias):
    """Accumulate dL/dW and dL/db of z = inputs W^T + b; return dL/dinputs."""
    grad_weight.addmm_(grad_z.T, inputs.to(grad_z.dtype))
    if grad_bias is not None:
        grad_bias += grad_z.sum(0)
    return grad_z @ weight_c


def _mixture_chunk(spec, logits, hidden, labels, weights, weight_c, params, grad_weight, grad_bias, grad_params):
    """MoS / MoSS on one chunk: the K components' logits `[K, C, V]` from one matmul, two passes over them (see the
    module table), and one matmul each for dL/dfeatures and dL/dW."""
    dtype = weight_c.dtype
    sigsoftmax = spec.head == "moss"
    with torch.enable_grad():
        leaf = hidden.detach().requires_grad_(grad_weight is not None)
        log_prior, features = spec.mixture(leaf)  # [C, K], [C, K, D]
    rows, num_components, width = features.shape
    flat_features = features.detach().transpose(0, 1).reshape(num_components * rows, width)  # [K*C, D]
    z = logits(flat_features).view(num_components, rows, -1)  # [K, C, V]
    log_prior_c = log_prior.detach().to(dtype)
    log_prob = None  # log P, the running logaddexp over components
    for k in range(num_components):
        term = _log_component(z[k], sigsoftmax).add_(log_prior_c[:, k, None])
        log_prob = term if log_prob is None else torch.logaddexp(log_prob, term, out=log_prob)
    eps, vocab = spec.label_smoothing, log_prob.shape[1]
    loss_rows = -(1.0 - eps) * log_prob.gather(1, labels[:, None]).squeeze(1)
    if eps:
        loss_rows -= eps / vocab * log_prob.sum(1)
    loss_rows *= weights
    if grad_weight is None:
        return loss_rows, None
    grad_prior = torch.empty_like(log_prior, dtype=dtype)  # [C, K]
    for k in range(num_components):
        log_f = _log_component(z[k], sigsoftmax)
        # G_k = -q r_k with r_k = exp(log pi_k + log f_k - log P): -eps/V r_k everywhere, -(1 - eps) r_k more at y
        big_g = (log_f + log_prior_c[:, k, None] - log_prob).exp_()  # r_k
        label_r = big_g.gather(1, labels[:, None])  # [C, 1]
        big_g.mul_(-eps / vocab).scatter_add_(1, labels[:, None], label_r.mul_(eps - 1.0))
        big_g.mul_(weights[:, None])
        sum_g = big_g.sum(1)  # [C] = dL/dlog pi_k
        grad_prior[:, k] = sum_g
        grad_z = big_g.sub_(log_f.exp_().mul_(sum_g[:, None]))  # G_k - f_k sum G_k
        if sigsoftmax:
            grad_z.mul_(z[k].sigmoid_().neg_().add_(2.0))
        z[k] = grad_z  # the component's logits are no longer needed: dL/dz_k in their place
    flat_grad = _fold_linear(z.view(num_components * rows, -1), flat_features, weight_c, grad_weight, grad_bias)
    grad_features = flat_grad.view(num_components, rows, width).transpose(0, 1)  # [C, K, D]
    mixture_params = [p for p in params if p.requires_grad]
    inputs = [leaf, *mixture_params]
    grads = torch.autograd.grad(
        (log_prior, features), inputs, (grad_prior.to(log_prior.dtype), grad_features.to(features.dtype)),
        allow_unused=True,
    )  # fmt: skip
    for param, grad in zip(mixture_params, grads[1:], strict=True):
        if grad is not None:
            grad_params[_position(params, param)] += grad
    return loss_rows, grads[0].to(dtype)


def _position(params: Sequence[torch.Tensor], param: torch.Tensor) -> int:
    return next(i for i, p in enumerate(params) if p is param)


def _log_component(z: torch.Tensor, sigsoftmax: bool) -> torch.Tensor:
    """log f(z) for f = softmax or sigsoftmax, as a new tensor."""
    if sigsoftmax:
        z = F.softplus(z).neg_().add_(z, alpha=2.0)  # g = 2z - softplus(z)
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    head: str = "softmax",
    theta: torch.Tensor | None = None,
    knot_range: float | None = None,
    mixture: MixtureFeatures | None = None,
    mixture_params: Sequence[torch.Tensor] = (),
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    rows: RowKernel = row_loss_and_grad,
) -> torch.Tensor:
    r"""The NLL of an LM head from its hidden states, in token chunks, without a `[N x V]` tensor (module docstring).

    Equals ``F.cross_entropy(head(hidden), labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
    reduction=reduction)`` for the matching :mod:`hf_sparse_attn.heads` head, forward and backward (gradients for
    ``hidden``, ``weight``, ``bias``, ``theta`` and ``mixture_params``). The matmuls run in the weight's dtype (or
    the autocast dtype); the normalisers, the loss and the accumulated gradients are float32 (float64 for float64
    weights). Memory: the gradients of the inputs (dL/dW is `[V, D]` float32) plus a few `[chunk x V]` buffers.

    Args:
        hidden (`torch.Tensor`): `[..., D]` hidden states h.
        weight (`torch.Tensor`): `[V, D]` output embedding W.
        labels (`torch.Tensor`): `[...]` int64 targets in [0, V), or ``ignore_index``.
        bias (`torch.Tensor`, *optional*): `[V]` output bias b.
        head (`str`, *optional*, defaults to ``"softmax"``): one of ``HEAD_LOSS_NAMES``.
        theta (`torch.Tensor`, *optional*): ``"plif"``: `[K - 1]` raw slopes (``MonotonicHead.extra.theta``).
        knot_range (`float`, *optional*): ``"plif"``: T > 0.
        mixture (`Callable`, *optional*): ``"mos"``/``"moss"``: hidden `[C, D]` -> (log pi `[C, K]`, features
            `[C, K, D]`), differentiable, e.g. ``MixtureHead.extra``; called once per chunk.
        mixture_params (`Sequence[torch.Tensor]`, *optional*): the tensors ``mixture`` depends on, which receive
            gradients (e.g. ``list(head.extra.parameters())``).
        ignore_index (`int`, *optional*, defaults to -100): label of tokens that do not count.
        label_smoothing (`float`, *optional*, defaults to 0.0): eps in [0, 1].
        reduction (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` over counted tokens (NaN if there are
            none, like ``F.cross_entropy``) or ``"sum"``.
        chunk_size (`int`, *optional*): tokens per chunk; the default keeps the chunk's logits (`[chunk x V]`, or
            `[K, chunk, V]` for the mixtures) near 2**22 elements.
        rows (`RowKernel`, *optional*): the per-chunk row work; :func:`row_loss_and_grad` (the reference) unless a
            dispatcher passes a kernel.

    Returns:
        `torch.Tensor`: the scalar loss, float32 (float64 for float64 weights).

    Examples::

        >>> hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8)
        >>> labels = torch.tensor([1, 2, 3, -100, 5, 6])
        >>> loss = head_loss(hidden, weight, labels, head="sigsoftmax", chunk_size=4)
        >>> from hf_sparse_attn.ops.sigsoftmax import log_sigsoftmax
        >>> unfused = F.nll_loss(log_sigsoftmax(hidden @ weight.T), labels)
        >>> bool(torch.allclose(loss, unfused))
        True
    """
    _check_arguments(hidden, weight, labels, bias, head, theta, knot_range, mixture, label_smoothing, reduction)
    vocab = weight.shape[0]
    if chunk_size is None:
        per_token = vocab * (mixture_components(mixture, hidden) if head in ("mos", "moss") else 1)
        chunk_size = max(1, CHUNK_ELEMENTS // per_token)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")
    device_type = weight.device.type
    autocast = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    params: tuple[torch.Tensor, ...] = ()
    if head == "plif":
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        params = segment_table(theta.to(dtype), float(knot_range))
    elif head in ("mos", "moss"):
        params = tuple(mixture_params)
    spec = _Spec(
        head, ignore_index, float(label_smoothing), reduction, chunk_size, matmul_dtype,
        None if knot_range is None else float(knot_range), mixture if head in ("mos", "moss") else None, rows,
    )  # fmt: skip
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _FusedHeadLoss.apply(flat_hidden, weight, bias, labels.reshape(-1), spec, *params)


def mixture_components(mixture: MixtureFeatures, hidden: torch.Tensor) -> int:
    """K of a mixture head: from its ``prior`` `[K, D]` parameter if it has one, else by calling it on one token."""
    prior = getattr(mixture, "prior", None)
    if isinstance(prior, torch.Tensor):
        return prior.shape[0]
    with torch.no_grad():
        return mixture(hidden.reshape(-1, hidden.shape[-1])[:1])[0].shape[1]


def _check_arguments(hidden, weight, labels, bias, head, theta, knot_range, mixture, label_smoothing, reduction):
    if head not in HEAD_LOSS_NAMES:
        raise ValueError(f"head must be one of {', '.join(map(repr, HEAD_LOSS_NAMES))}; got {head!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, int | float)
        or not (0.0 <= label_smoothing <= 1.0)
    ):
        raise ValueError(f"label_smoothing must be a float in [0, 1]; got {label_smoothing!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight must be [V, D] and hidden [..., D] with the same D; got {tuple(weight.shape)} and "
            f"{tuple(hidden.shape)}"
        )
    if labels.shape != hidden.shape[:-1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(hidden.shape[:-1])} (hidden without its last dim); "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}]; got {tuple(bias.shape)}")
    if head == "plif" and (
        theta is None or theta.dim() != 1 or knot_range is None or not 0 < knot_range < float("inf")
    ):
        raise ValueError(f"head='plif' needs theta [K - 1] and a finite knot_range > 0; got {theta!r}, {knot_range!r}")
    if head in ("mos", "moss") and not callable(mixture):
        raise ValueError(f"head={head!r} needs mixture, a callable hidden -> (log_prior, features); got {mixture!r}")
