"""r-softmax: a softmax whose rows have a chosen fraction of exact zeros.

Bałazy, Struski, Śmieja, Tabor, "r-softmax: Generalized Softmax with Controllable Sparsity Rate" (ICCS 2023,
arXiv 2304.05243); official code: https://github.com/gmum/rsoftmax. This file is the plain-PyTorch reference and
therefore the specification (DESIGN §2): kernels must reproduce :func:`r_softmax` and :class:`RSoftmax`.

For a row ``x`` over its valid positions ``V`` (``k = |V|``) and a rate ``r`` in ``[0, 1]``::

    m   = max_{i in V} x_i
    q_r = r-quantile of {x_i : i in V}: order statistics x_(0) <= ... <= x_(k-1), position r (k - 1),
          linear interpolation between x_(floor) and x_(ceil) (torch.quantile's default)
    t   = m - q_r + eps                                  # the margin, detached; eps keeps t > 0
    w_i = relu(x_i - m + t) for i in V, 0 otherwise       # = relu(x_i - q_r + eps)
    p_i = w_i exp(x_i - m) / sum_j w_j exp(x_j - m)

Valid entries ``x_i <= q_r - eps`` get exactly 0, so about ``r (k - 1)`` of the ``k`` valid entries vanish; the
row maximum keeps weight ``t > 0``, so a row with a valid position is never empty.

Masking differs from the official code on purpose: it sets masked entries to the row maximum before the
quantile, so padding eats into the rate (8 real + 8 padded keys at r = 0.75 collapse to a one-hot). Here the
quantile runs over valid positions only (``mask`` True and ``x > -inf``), masked positions get exactly 0, and a
row with no valid position gives zeros, never NaN.

NaN (decided in issue 10, item 11, for the reference and the kernels alike): a NaN at a valid position makes the
whole row NaN -- its output, margin and gradient -- as ``torch.softmax`` and SDPA do, so a diverging model is not
hidden; a NaN at a masked position is ignored like any content there.

Speed: the quantile costs one sort per row (numpy's vectorised sort on CPU, see :func:`_sort_rows`), and the
forward holds two score-sized buffers (the masked scores and the sorted copy, which then receives ``p``), the
backward three; docs/r_softmax.md ("Speed on CPU") has the measurements.

Gradient, as in the official code: ``t`` is detached, ``m`` is not, so the threshold ``m - t`` moves with the
maximum. With ``e_i = exp(x_i - m)``, ``c_i = 1[x_i - m + t > 0]``, ``a_i = w_i e_i``, ``S = sum_i a_i``,
``b_i = (c_i + w_i) e_i``, ``M = argmax`` and upstream gradient ``g``::

    dx_j = b_j (g_j - <g, p>) / S  -  1[j = M] sum_i c_i e_i (g_i - <g, p>) / S

:class:`RSoftmax` implements it by hand; :func:`_r_softmax_autograd` is the same map written with plain torch ops
and differentiated by autograd: the executable specification of the gradient that the tests check it against.
"""

from __future__ import annotations

from numbers import Real

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["RSoftmax", "r_softmax", "r_softmax_margin"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype (fp16/bf16 would overflow in ``x - m``), float64 kept for gradcheck."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_shape(x: torch.Tensor, dim: int) -> list[int]:
    shape = list(x.shape)
    shape[dim] = 1
    return shape


def _fits(shape: torch.Size, target: list[int]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (never enlarging it)."""
    try:
        return list(torch.broadcast_shapes(shape, target)) == list(target)
    except RuntimeError:
        return False


def _check_inputs(x: torch.Tensor, r: float | torch.Tensor, dim: int, mask: torch.Tensor | None, eps: float) -> None:
    """Validate the public arguments; raise ``TypeError``/``ValueError`` naming the argument and allowed values."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32 or float64); got {got}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the rows r-softmax normalises); got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}; got {dim!r}"
        )
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0.0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number > 0 (it keeps the row maximum alive); got {eps!r}")

    if isinstance(r, torch.Tensor):
        if r.dtype == torch.bool or r.is_complex():
            raise TypeError(f"r must be a real number or a real-valued tensor; got a tensor of dtype {r.dtype}")
        if not _fits(r.shape, _row_shape(x, dim)):
            raise ValueError(
                f"r of shape {tuple(r.shape)} must broadcast to the row shape {tuple(_row_shape(x, dim))} of x "
                f"(x is {tuple(x.shape)}, dim={dim}): size 1 along dim, e.g. [1, H, 1, 1] for one rate per head"
            )
        bad = ~((r >= 0) & (r <= 1))  # NaN fails both comparisons
        if bad.any():
            raise ValueError(f"r must lie in [0, 1]; got {r[bad].flatten()[0].item()!r} in the tensor r")
    elif isinstance(r, bool) or not isinstance(r, Real):
        raise TypeError(f"r must be a number in [0, 1] or a tensor of rates; got {type(r).__name__} {r!r}")
    elif not 0.0 <= float(r) <= 1.0:  # also rejects NaN
        raise ValueError(f"r must lie in [0, 1]; got {r!r}")

    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = f"dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = valid position); got {got}")
        if not _fits(mask.shape, list(x.shape)):
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of shape {tuple(x.shape)}")


def _scores(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in the compute dtype with masked positions at ``-inf`` (whatever they held, even NaN); one pass over
    ``x``, and ``x`` itself (no copy) when there is no mask and the dtype matches."""
    return x.to(dtype) if mask is None else torch.where(mask, x, float("-inf")).to(dtype)


def _sort_rows(scores: torch.Tensor) -> torch.Tensor:
    """The values of ``scores`` sorted ascending along the last dim (NaN last), in a new contiguous tensor.

    On CPU, numpy's sort: it vectorises (x86-simd-sort with AVX2/AVX-512, Highway's vqsort on Arm) and sorted the
    ``[8, 12, 128, 128]`` attention scores of a MiniLM layer ~30x faster than ``torch.sort``, whose per-row sort
    took ~45% of the patched model's forward (docs/r_softmax.md, "Speed on CPU"). Sorting is exact, so both give the
    same values: NaN last, ``-0.0`` and ``0.0`` tied. numpy sorts on one thread (torch.sort splits rows across
    threads, ~30x slower per thread). ``torch.sort`` everywhere else: other devices, tensor subclasses (e.g. the
    fake tensors of tracing) and under ``torch.compile``.
    """
    if scores.device.type == "cpu" and type(scores) is torch.Tensor and not torch.compiler.is_compiling():
        ordered = scores.clone(memory_format=torch.contiguous_format)  # torch's memory, sorted in place by numpy
        ordered.numpy().sort(axis=-1)
        return ordered
    return scores.sort(dim=-1).values


def _margin_and_max(ordered: torch.Tensor, r: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, m)``, both ``[..., 1]``, from the masked scores (``-inf`` = masked) sorted along the last dim.

    ``t = m - q_r + eps`` as the module docstring defines it, with no Python loop and O(N) memory per row: the
    sort puts the masked entries first (``-inf``), so the ``k`` valid ones are the last ``k`` of the row and the
    row maximum is its last entry. Position ``r (k - 1)`` among them and the interpolation are computed as
    torch.quantile computes them. A row with no valid entry gets ``t = eps`` and ``m = -inf``; a NaN at a valid
    position sorts last and gives ``m = NaN``, so the whole row comes out NaN. ``ordered`` is no longer needed
    afterwards: ``t`` and ``m`` are new tensors.
    """
    n = ordered.shape[-1]
    neg_inf = ordered.new_full((*ordered.shape[:-1], 1), float("-inf"))
    first = torch.searchsorted(ordered, neg_inf, right=True)  # (..., 1) masked count N - k: first valid index
    start = first.clamp(max=n - 1)  # an empty row (first = N) reads index N - 1 and gets t = eps below
    position = r * (n - 1 - start).to(ordered.dtype)  # (..., 1) r (k - 1)
    below = position.floor().long()
    above = position.ceil().long()
    low, high = ordered.gather(-1, start + below), ordered.gather(-1, start + above)
    quantile = torch.lerp(low, high, position - below.to(ordered.dtype))  # (..., 1)
    row_max = ordered[..., -1:].clone()  # (..., 1)
    return torch.where(first < n, row_max - quantile + eps, eps), row_max  # empty: -inf - -inf = NaN -> eps


def _weighted(
    ctx: FunctionCtx,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    scores: torch.Tensor,
    t: torch.Tensor,
    row_max: torch.Tensor,
    spare: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward shared by both Functions: ``p`` from the masked ``scores``, ``t`` and ``m``; saves for the VJP.

    Few full-size temporaries, because on CPU each fresh one costs more than the arithmetic (page faults):
    ``scores`` is overwritten unless it is ``x`` itself, and ``p`` is written into ``spare`` (a tensor shaped like
    ``scores`` that the caller no longer needs) when one is given.

    ``e = exp(x - m)`` is taken of ``max(x - m, -t)``: only alive entries (``x - m > -t``) use ``e``, and they are
    unchanged, so ``p`` is the same bit for bit; the dead and masked ones (``w = 0``) no longer hand ``exp`` the
    ``-inf`` and deep negative inputs that take its slow path on CPU (10-100x slower per element, measured).
    """
    row_max = row_max.masked_fill(row_max == float("-inf"), 0.0)  # empty row: exp(-inf - 0) = 0, not NaN
    shifted = scores - row_max if scores is x else scores.sub_(row_max)  # (..., N) x - m
    lifted = torch.add(shifted, t, out=spare) if spare is not None else shifted + t  # (..., N) u = x - m + t
    weighted = lifted.relu_().mul_(shifted.clamp_(min=t.neg()).exp_())  # (..., N) a = w e
    total = weighted.sum(dim=-1, keepdim=True)  # (..., 1) S, 0 only for a row with no valid position
    total = total.masked_fill(total == 0, 1.0)
    ctx.save_for_backward(x, mask, t, row_max, total)
    return weighted.div_(total).to(x.dtype)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_i a_i b_i`` along the last dim, ``[..., 1]``, without the full-size product in memory."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).squeeze(-1)  # (..., 1, N) @ (..., N, 1) -> (..., 1)


def _vjp(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
    """``dx`` of the module docstring, from what :func:`_weighted` saved: ``e``, ``w``, ``c`` and ``p`` recomputed.

    Three full-size temporaries, no bool mask: selecting with a data-dependent bool mask (``masked_fill``,
    ``where``) branches per element on CPU and took ~10x as long as the arithmetic around it.
    """
    x, mask, t, row_max, total = ctx.saved_tensors
    scores = _scores(x, mask, t.dtype)  # (..., N)
    # Ties: torch.max picks one index, and autograd through torch.max(...).values sends the gradient there.
    argmax = scores.max(dim=-1, keepdim=True).indices  # (..., 1)
    shifted = scores - row_max if scores is x else scores.sub_(row_max)  # (..., N) x - m
    exp = shifted.clamp(min=t.neg()).exp_()  # e where it is used (c = 1), see _weighted
    lifted = shifted.add_(t)  # u = x - m + t: w = relu(u), c = 1[u > 0]
    alive = torch.gt(lifted, 0, out=torch.empty_like(lifted))  # c as 0.0 / 1.0
    alive_exp = exp.mul_(alive)  # c e
    weighted_exp = lifted.relu_().mul_(alive_exp)  # a = w e (w = 0 where c = 0)
    g = grad.to(t.dtype)
    mean = _row_dot(g, weighted_exp) / total  # (..., 1) <g, p>
    centred = torch.sub(g, mean, out=alive).div_(total)  # (g - <g, p>) / S
    through_max = _row_dot(alive_exp, centred)  # (..., 1) sum_i c_i e_i (g_i - <g, p>) / S
    grad_x = weighted_exp.add_(alive_exp).mul_(centred)  # b_j (g_j - <g, p>) / S, b = (c + w) e
    # The threshold m - t moves with the maximum, so the max's share goes to the argmax.
    return grad_x.scatter_add_(-1, argmax, through_max.neg()).to(x.dtype)


class RSoftmax(torch.autograd.Function):
    """r-softmax along the last dim for a given margin ``t``, with the hand-derived VJP of the module docstring.

    ``RSoftmax.apply(x, t, mask) -> p``:

    - ``x``: scores ``[..., N]``, any float dtype; computed in float32 (float64 stays float64), ``p`` has
      ``x.dtype``. Positions where ``x == -inf`` count as masked.
    - ``t``: margin ``[..., 1]`` in the compute dtype, from :func:`r_softmax_margin`; a constant (no gradient),
      which is what makes this the official gradient and lets ``gradcheck`` test it by finite differences.
    - ``mask``: bool broadcastable to ``x`` (True = valid) or None.

    Inputs are trusted: :func:`r_softmax` is the validated entry point. The forward saves ``x`` (in its own
    dtype) plus per-row ``t``, ``m`` and ``S``, and the backward recomputes ``e``, ``w``, ``c``, ``p`` and the
    argmax from them, FlashAttention-style: ``p`` alone would not do, because the VJP needs ``w`` and ``p``
    determines ``w`` only through a Lambert-W inversion. Ties for the maximum: the whole ``1[j = M]`` term goes to
    the single index ``torch.max`` returns, exactly as autograd through ``torch.max(x, dim).values`` in the
    official code does (``torch.amax`` would split it evenly).

    Examples::
        >>> x = torch.tensor([[3.0, 2.0, 1.0, 1.0]], requires_grad=True)
        >>> p = RSoftmax.apply(x, r_softmax_margin(x, 0.5), None)
        >>> p
        tensor([[0.8908, 0.1092, 0.0000, 0.0000]], grad_fn=<RSoftmaxBackward>)
        >>> p[0, 0].backward()
        >>> x.grad  # the last two entries are below the threshold: zero gradient
        tensor([[ 0.2919, -0.2919, -0.0000, -0.0000]])
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        scores = _scores(x, mask, t.dtype)  # (..., N)
        return _weighted(ctx, x, mask, scores, t, scores.amax(dim=-1, keepdim=True))

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _vjp(ctx, grad), None, None


class _RateRSoftmax(torch.autograd.Function):
    """:class:`RSoftmax` with the margin found inside the forward from the rate: ``apply(x, r, mask, eps)``.

    This is what :func:`r_softmax` runs, so that the quantile and the weights share one masked float32 copy of the
    scores and the sort also yields the row maximum. Same forward values and VJP as :class:`RSoftmax` with
    ``t = r_softmax_margin(x, r, mask=mask, eps=eps)``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, r: torch.Tensor, mask: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        scores = _scores(x, mask, r.dtype)  # (..., N)
        ordered = _sort_rows(scores)  # (..., N) masked (-inf) first, ascending, NaN last
        t, row_max = _margin_and_max(ordered, r, eps)  # (..., 1)
        return _weighted(ctx, x, mask, scores, t, row_max, spare=ordered)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _vjp(ctx, grad), None, None, None


def _prepare(
    x: torch.Tensor, r: float | torch.Tensor, dim: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Views of ``x``, ``r`` and ``mask`` with ``dim`` moved last; ``r`` as a tensor in the compute dtype."""
    compute = _compute_dtype(x.dtype)
    if isinstance(r, torch.Tensor):
        rate = r.detach().to(x.device, compute).broadcast_to(_row_shape(x, dim)).movedim(dim, -1)  # (..., 1)
    else:
        rate = torch.tensor(float(r), dtype=compute, device=x.device)
    if mask is not None:
        mask = mask.to(x.device).broadcast_to(x.shape).movedim(dim, -1)  # (..., N)
    return x.movedim(dim, -1), rate, mask


def r_softmax_margin(
    x: torch.Tensor, r: float | torch.Tensor, *, dim: int = -1, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """The detached margin ``t = m - q_r + eps`` of each row, as :func:`r_softmax` uses it.

    ``m - t = q_r - eps`` is the threshold: valid entries at or below it get probability exactly 0. Kernels that
    find the quantile by selection or search are checked against this.

    Args:
        x: scores ``[..., N, ...]``; any float dtype.
        r: rate in ``[0, 1]``: a number, or a tensor broadcastable to ``x`` with size 1 along ``dim``.
        dim: the dimension the rows run along.
        mask: optional bool tensor broadcastable to ``x``; True marks a valid position.
        eps: added to the margin so that the row maximum always survives; > 0.

    Returns:
        ``t`` shaped like ``x`` with size 1 along ``dim``, in float32 (float64 for float64 ``x``). Rows with no
        valid position get ``eps``; rows with a NaN at a valid position get NaN.

    Examples::
        >>> r_softmax_margin(torch.tensor([3.0, 2.0, 1.0, 1.0]), 0.5)  # m = 3, q_0.5 = 1.5
        tensor([1.5000])
    """
    _check_inputs(x, r, dim, mask, eps)
    rows, rate, rows_mask = _prepare(x, r, dim, mask)
    margin, _ = _margin_and_max(_sort_rows(_scores(rows.detach(), rows_mask, rate.dtype)), rate, eps)  # (..., 1)
    return margin.movedim(-1, dim)


def r_softmax(
    x: torch.Tensor, r: float | torch.Tensor, *, dim: int = -1, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """r-softmax: a probability distribution over each row in which a fraction ``r`` of valid entries is 0.

    With ``k`` valid entries in a row, ``m`` their maximum and ``q_r`` their r-quantile (linear interpolation,
    as ``torch.quantile``), ``p_i = relu(x_i - q_r + eps) exp(x_i - m) / Z``: the entries at or below
    ``q_r - eps`` get exactly 0. For distinct values that is ``floor(r (k - 1))`` or ``ceil(r (k - 1))`` of them
    (in float32 ``eps`` can round away at the quantile itself: at most ``floor(r (k - 1)) + 1``); the maximum
    always survives. ``r`` counts *valid* positions only: masked ones (``mask`` False, or ``x == -inf``) get
    exactly 0 and do not enter the quantile; a row with no valid position gives zeros, never NaN, and a NaN at a
    valid position makes the whole row NaN, as in ``torch.softmax`` (masked NaN are ignored). ``r = 1``
    gives a one-hot on the argmax (ties share); ``r = 0`` is *not* softmax, so use ``torch.softmax`` where no
    sparsity is wanted. Computed in float32 (float64 stays float64), returned in ``x.dtype``. The margin
    ``m - q_r + eps`` is detached (``r`` gets no gradient); see :class:`RSoftmax` for the gradient.

    Args:
        x: scores ``[..., N, ...]``, e.g. attention scores ``[B, H, T, S]`` with ``dim=-1``; finite at valid
            positions (a NaN there gives a NaN row).
        r: rate in ``[0, 1]``: a number, or a tensor broadcastable to ``x`` with size 1 along ``dim``, e.g.
            ``[1, H, 1, 1]`` (one rate per head of ``[B, H, T, S]`` scores) or ``[B, H, T, 1]`` (one per row).
        dim: the dimension to normalise over.
        mask: optional bool tensor broadcastable to ``x``, True = valid position, e.g. a ``[B, 1, T, S]``
            padding + causal mask.
        eps: margin epsilon, > 0 (1e-8 as in the official code).

    Returns:
        Probabilities with the shape and dtype of ``x``; each row with a valid position sums to 1.

    Examples::
        >>> r_softmax(torch.tensor([3.0, 2.0, 1.0, 1.0]), 0.5)
        tensor([0.8908, 0.1092, 0.0000, 0.0000])
        >>> r_softmax(torch.tensor([[3.0, 2.0, 1.0, 1.0], [4.0, 6.0, 5.0, 5.0]]), torch.tensor([[0.75], [0.25]]))
        tensor([[1.0000, 0.0000, 0.0000, 0.0000],
                [0.0000, 0.8717, 0.0641, 0.0641]])
        >>> r_softmax(torch.tensor([3.0, 2.0, 1.0, 9.0]), 0.5, mask=torch.tensor([True, True, True, False]))
        tensor([1., 0., 0., 0.])
    """
    _check_inputs(x, r, dim, mask, eps)
    rows, rate, rows_mask = _prepare(x, r, dim, mask)
    return _RateRSoftmax.apply(rows, rate, rows_mask, eps).movedim(-1, dim)


def _r_softmax_autograd(
    x: torch.Tensor, r: float | torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8
) -> torch.Tensor:
    """The executable specification of the gradient: r-softmax along the last dim in plain torch ops.

    Same map as :func:`r_softmax` (``r`` a number or a tensor broadcastable to ``[..., 1]``), written the direct
    way and differentiated by autograd: the quantile comes from ``torch.nanquantile`` on the scores with masked
    positions set to NaN (one call per row, so this is for tests on small inputs only), ``t`` is detached, ``m``
    comes from ``torch.max(...).values`` as in the official code.
    """
    dtype = _compute_dtype(x.dtype)
    xc = x.to(dtype)
    valid = xc != float("-inf") if mask is None else (xc != float("-inf")) & mask
    has_valid = valid.any(dim=-1, keepdim=True)  # (..., 1)
    rows = xc.detach().masked_fill(~valid, float("nan"))  # (..., N)
    rate = torch.as_tensor(r, dtype=dtype).broadcast_to((*x.shape[:-1], 1))  # (..., 1)
    pairs = zip(rows.reshape(-1, x.shape[-1]), rate.reshape(-1), strict=True)  # (R, N) rows with their rates
    quantile = torch.stack([torch.nanquantile(row, rate_row) for row, rate_row in pairs]).reshape(rate.shape)
    row_max = xc.masked_fill(~valid, float("-inf")).max(dim=-1, keepdim=True).values  # (..., 1)
    row_max = torch.where(has_valid, row_max, 0.0)
    t = torch.where(has_valid, row_max - quantile, 0.0).detach() + eps
    shifted = torch.where(valid, xc - row_max, float("-inf"))  # (..., N)
    weighted = torch.relu(shifted + t) * torch.exp(shifted)
    total = weighted.sum(dim=-1, keepdim=True)
    return (weighted / torch.where(total > 0, total, 1.0)).to(x.dtype)
