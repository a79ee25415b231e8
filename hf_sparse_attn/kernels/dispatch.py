"""Dispatcher for r-softmax attention: the Triton kernel where it applies, the reference everywhere else.

Kernels are an optimisation, never a requirement (DESIGN §3): Triton is imported only when the kernel path is
taken, so this module works without Triton installed. Both paths compute the same function (the kernel is tested
against the reference at fp32 tolerance); the reference is :func:`hf_sparse_attn.ops.r_softmax` on the
materialised ``[B, H, T, S]`` scores ``(scaling q) kᵀ + bias``. Scaling ``q`` before the product keeps fp16 scores
finite wherever the scaled scores fit in fp16, as in SDPA (``q·k`` itself may overflow).

The kernel covers per-(batch, key) padding and an optional causal pattern with queries aligned to the end of the
keys (query ``i`` sees key ``j`` iff ``j <= i + S - T``, as under a KV cache), one rate per head (or one for all),
fp16/bf16/fp32, head dims 16/32/64/128, attention dropout (drawn inside the kernel), no returned weights. Callers
describe such a mask by its structure, ``key_padding [B, S]`` and ``causal_offset``, never by a materialised
``[B, T, S]`` mask: the dispatcher does not read mask values, so the kernel path makes no host sync and allocates
nothing of size ``[B, T, S]``, and which path runs never depends on data. A general boolean ``valid`` mask or an
additive ``bias`` takes the reference. :mod:`hf_sparse_attn.attention` derives the structure from what transformers
hands over. ``backend="auto"`` uses the kernel for a (device, dtype, head dim) only after it passed a first-use
self-check against the reference (:mod:`hf_sparse_attn.kernels.self_check`). Nothing here hides a NaN: a NaN score
at a valid key gives a NaN row on every path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from numbers import Real

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from hf_sparse_attn.ops.r_softmax import r_softmax

__all__ = ["kernel_unsupported_reason", "r_softmax_attention", "triton_available"]

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
#: override of backend="auto": "0" = always the reference (e.g. to bisect a numerical issue), "1" = the kernel
#: wherever it applies, without the first-use self-check (e.g. to benchmark or debug the kernel itself); unset =
#: the kernel where it applies and passed its self-check
KERNELS_ENV = "HF_SPARSE_ATTN_KERNELS"
KERNELS_ENV_VALUES = ("0", "1")
#: rate tensor -> ((in-place version, device), validated fp32 rates [H] on that device): checked and copied once
_KERNEL_RATES: WeakIdKeyDictionary = WeakIdKeyDictionary()


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def kernels_override() -> str | None:
    """The value of :data:`KERNELS_ENV` (``"0"`` or ``"1"``), or None when it is unset or empty.

    Raises:
        ValueError: for any other value (a typo must not silently pick a path)."""
    value = os.environ.get(KERNELS_ENV) or None
    if value is not None and value not in KERNELS_ENV_VALUES:
        raise ValueError(
            f"{KERNELS_ENV} must be unset, '0' (always the reference) or '1' (the kernel wherever it applies, "
            f"without the first-use self-check); got {value!r}"
        )
    return value


def _kernel_rates(rate: float | torch.Tensor, heads: int, device: torch.device) -> torch.Tensor | None:
    """fp32 ``[H]`` rates on ``device`` for the kernel, or None when ``rate`` differs within a head (per batch or row).

    No host sync for a number. A tensor is range-checked and copied to ``device`` once per (tensor, in-place
    version, device) and cached, so a layer's rate tensor costs one check on its first call, not one per call.

    Raises:
        ValueError: for a rate outside ``[0, 1]`` (or NaN)."""
    if not isinstance(rate, torch.Tensor):
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rate must lie in [0, 1]; got {rate!r}")
        return torch.full((heads,), float(rate), dtype=torch.float32, device=device)
    if rate.numel() != 1 and not (rate.numel() == heads and (rate.dim() == 1 or rate.shape[-3:] == (heads, 1, 1))):
        return None
    key = (None if rate.is_inference() else rate._version, device)  # inference tensors have no version counter
    cached = _KERNEL_RATES.get(rate)
    if cached is not None and key[0] is not None and cached[0] == key:
        return cached[1]
    values = rate.detach().reshape(-1).to(torch.float32)
    if not ((values >= 0) & (values <= 1)).all():
        raise ValueError(f"rate must lie in [0, 1]; got {rate!r}")
    rates = values.expand(heads).to(device, non_blocking=True).contiguous()  # (H,), once per tensor version
    _KERNEL_RATES[rate] = (key, rates)
    return rates


def structured_mask(
    key_padding: torch.Tensor | None, causal_offset: int | None, t_len: int, s_len: int, device: torch.device
) -> torch.Tensor | None:
    """The bool mask that ``key_padding`` and ``causal_offset`` describe, broadcastable to ``[B, 1, T, S]``.

    ``mask[b, 0, i, j] = key_padding[b, j] and j <= i + causal_offset`` (a missing part is all True); None when
    both are None. Only the reference path materialises it."""
    mask = None if key_padding is None else key_padding[:, None, None, :]  # (B, 1, 1, S)
    if causal_offset is not None and causal_offset < s_len - 1:
        rows = torch.arange(t_len, device=device)[:, None]
        cols = torch.arange(s_len, device=device)[None, :]
        causal = cols <= rows + causal_offset  # (T, S)
        mask = causal if mask is None else mask & causal  # (B, 1, T, S)
    return mask


def kernel_unsupported_reason(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False
) -> str | None:
    """Why the Triton kernel cannot run this call (static checks only, no device sync), or None if it can.

    The mask structure and the rate are checked later, in :func:`r_softmax_attention`, also without a sync."""
    if query.dtype not in KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}; the kernel needs one of {KERNEL_DTYPES} for all"
    if query.shape[-1] not in KERNEL_HEAD_DIMS or value.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]} (value {value.shape[-1]}); the kernel supports {KERNEL_HEAD_DIMS}"
    if key.shape[:2] != query.shape[:2] or value.shape[:3] != key.shape[:3]:
        return f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} need the [B, H] of query (no GQA)"
    if need_weights:
        return "attention weights were requested (the kernel never materialises them)"
    if not triton_available():
        return "triton is not installed (pip install 'hf-sparse-attn[triton]')"
    if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {query.device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1 for testing)"
    return None


def _reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    rate: float | torch.Tensor,
    scaling: float,
    eps: float,
    dropout: float,
    training: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # (B, H, T, S); no fp16 overflow of raw q·k
    if bias is not None:
        scores = scores + bias  # additive mask, as eager attention adds it (dtype promotion included)
    if isinstance(rate, torch.Tensor) and rate.dim() == 1:
        rate = rate.to(scores.device).view(1, -1, 1, 1)  # per-head rates: (1, H, 1, 1)
    probs = r_softmax(scores, rate, mask=valid, eps=eps)  # (B, H, T, S)
    dropped = F.dropout(probs, p=dropout, training=training)
    output = torch.matmul(dropped.to(value.dtype), value)  # (B, H, T, D)
    return output.transpose(1, 2).contiguous(), probs  # (B, T, H, D)


def _check_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: object,
    bias: object,
    key_padding: object,
    causal_offset: object,
    rate: object,
    eps: float,
    backend: str,
) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 4-d tensor [B, H, T or S, D]; got {got}")
    scores_shape = (*query.shape[:-1], key.shape[-2])  # (B, H, T, S)
    for name, tensor, kind in (("valid", valid, "bool"), ("bias", bias, "floating-point")):
        if tensor is None:
            continue
        is_tensor = isinstance(tensor, torch.Tensor)
        if not (is_tensor and (tensor.dtype == torch.bool if kind == "bool" else tensor.is_floating_point())):
            got = f"dtype {tensor.dtype}" if is_tensor else type(tensor).__name__
            raise TypeError(f"{name} must be None or a {kind} tensor; got {got}")
        try:
            torch.broadcast_shapes(tensor.shape, scores_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} of shape {tuple(tensor.shape)} does not broadcast to the scores [B, H, T, S] = {scores_shape}"
            ) from None
    if key_padding is not None:
        if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool:
            got = f"dtype {key_padding.dtype}" if isinstance(key_padding, torch.Tensor) else type(key_padding).__name__
            raise TypeError(f"key_padding must be None or a bool tensor [B, S] (True = valid key); got {got}")
        if (
            key_padding.dim() != 2
            or key_padding.shape[0] not in (1, query.shape[0])
            or key_padding.shape[1] != key.shape[-2]
        ):
            raise ValueError(
                f"key_padding must have shape [B, S] = {(query.shape[0], key.shape[-2])} (or [1, S]); "
                f"got {tuple(key_padding.shape)}"
            )
        if key_padding.device != query.device:
            raise ValueError(f"key_padding is on {key_padding.device}, query on {query.device}; they must match")
    if causal_offset is not None and (isinstance(causal_offset, bool) or not isinstance(causal_offset, int)):
        raise TypeError(
            f"causal_offset must be None (not causal) or an int d (query i sees keys j <= i + d); got {causal_offset!r}"
        )
    if rate is None or isinstance(rate, bool) or not isinstance(rate, Real | torch.Tensor):
        raise TypeError(f"rate must be a number in [0, 1] or a tensor of rates (None means softmax); got {rate!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0.0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")


def _kernel_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    bias: torch.Tensor | None,
    key_padding: torch.Tensor | None,
    causal_offset: int | None,
    rate: float | torch.Tensor,
    need_weights: bool,
    backend: str,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, bool] | None, str | None]:
    """``((key, value, key_padding [B, S] or None, rates [H], causal), None)`` when the kernel can run the call, else
    ``(None, reason)``.

    Decided from shapes, dtypes, flags and Python numbers only: no host sync, no ``[B, T, S]`` temporary, and the
    same path for any tensor values. A causal offset below ``S - T`` (keys past ``T + causal_offset`` are visible to
    no query, e.g. the empty slots of a static cache) is handled by slicing ``key``/``value`` to those keys, which
    turns it into the kernel's ``S - T``. Raises ``ValueError`` for rates outside [0, 1]."""
    override = kernels_override() if backend == "auto" else None
    if backend == "reference" or override == "0":
        return None, "the reference backend was requested" if backend == "reference" else f"{KERNELS_ENV}=0"
    if backend == "auto" and not query.is_cuda:
        return None, f"tensors are on {query.device.type}, not CUDA"
    reason = kernel_unsupported_reason(query, key, value, need_weights)
    if reason is not None:
        return None, reason
    if valid is not None or bias is not None:
        return None, "a general mask (valid or bias) was given; the kernel takes key_padding and causal_offset only"
    rates = _kernel_rates(rate, query.shape[1], query.device)
    if rates is None:
        return None, f"rate of shape {tuple(rate.shape)} is not one value per head"
    t_len, s_len = query.shape[2], key.shape[2]
    causal = causal_offset is not None and causal_offset < s_len - 1  # else every query sees every key
    if causal:
        visible = t_len + causal_offset  # keys j >= visible are masked for every query
        if not 0 < visible <= s_len:
            return None, f"causal_offset {causal_offset} with T = {t_len}, S = {s_len}: the kernel needs 0 < T + d <= S"
        if visible < s_len:
            key, value = key[:, :, :visible], value[:, :, :visible]  # views: (B, H, T + d, D)
            key_padding = None if key_padding is None else key_padding[:, :visible]
    if backend == "auto" and override is None:
        from hf_sparse_attn.kernels import self_check

        if not self_check.kernel_verified(query.device, query.dtype, query.shape[-1]):
            return (
                None,
                f"the kernel failed its self-check for {query.dtype}, head dim {query.shape[-1]} on {query.device}",
            )
    if key_padding is not None:
        key_padding = key_padding.expand(query.shape[0], key.shape[2])  # (B, S), maybe stride 0
    return (key, value, key_padding, rates, causal), None


def r_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    rate: float | torch.Tensor = 0.5,
    scaling: float | None = None,
    eps: float = 1e-8,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
    *,
    bias: torch.Tensor | None = None,
    key_padding: torch.Tensor | None = None,
    causal_offset: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with r-softmax: ``o = r_softmax(scaling q k^T + bias, rate, mask=M) v``.

    The mask ``M[b, h, i, j] = valid[b, h, i, j] and key_padding[b, j] and j <= i + causal_offset`` (a part that is
    None is all True). Each query row keeps the keys whose score exceeds the r-quantile of its *valid* scores
    (DESIGN §2): a fraction ``rate`` of the valid keys gets weight exactly 0, masked keys get 0 and do not enter the
    quantile, and a row with no valid key gives a zero output. ``backend="auto"`` runs the flash-style Triton kernel
    (no ``[T, S]`` matrix in memory) when :func:`kernel_unsupported_reason` finds nothing against it, the mask is
    given by ``key_padding`` and ``causal_offset`` alone, and the kernel passed its first-use self-check for this
    device, dtype and head dim (:mod:`hf_sparse_attn.kernels.self_check`; :data:`KERNELS_ENV` overrides it);
    otherwise the reference, which gives the same numbers. The choice never reads tensor values.

    Args:
        query: ``[B, H, T, D]``.
        key, value: ``[B, H, S, D]`` (``S > T`` under a KV cache).
        valid: bool mask broadcastable to ``[B, H, T, S]`` (True = the query may attend the key) of any pattern;
            it always takes the reference path. None = no such mask.
        rate: sparsity rate in ``[0, 1]``: a number, a tensor ``[H]`` (one per head), or for the reference any
            tensor broadcastable to ``[B, H, T, 1]``.
        scaling: multiplier of ``q·k``; defaults to ``D ** -0.5``.
        eps: r-softmax margin epsilon (> 0).
        dropout, training: attention dropout probability, applied to the probabilities when ``training``.
        need_weights: the caller needs the ``[B, H, T, S]`` probabilities (forces the reference path).
        bias: optional float tensor broadcastable to ``[B, H, T, S]`` added to the scaled scores, e.g. the additive
            mask of eager attention (its entries at masked keys are ignored, whatever they hold). Reference only.
        key_padding: bool ``[B, S]`` or ``[1, S]`` (True = the key is valid for every query), or None.
        causal_offset: None (not causal) or an int ``d``: query ``i`` sees keys ``j <= i + d``. ``S - T`` aligns
            the queries to the end of the keys (a KV cache), ``0`` to the start (SDPA's ``is_causal``); ``d >= S - 1``
            masks nothing.
        backend: ``"auto"``, ``"triton"`` (the kernel without the self-check; ``ValueError`` when it cannot run
            the call) or ``"reference"``.

    Returns:
        ``(output [B, T, H, D], probabilities [B, H, T, S] before dropout)`` from the reference path, ``(output,
        None)`` from the kernel, which never materialises them.

    Examples::
        >>> q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
        >>> padding = torch.tensor([[True] * 16, [True] * 12 + [False] * 4])  # (B, S): row 1 has 4 padded keys
        >>> # causal and padded; on CPU this takes the reference path, on CUDA the kernel
        >>> out, weights = r_softmax_attention(q, k, v, rate=0.5, key_padding=padding, causal_offset=0)
        >>> out.shape, weights.shape
        (torch.Size([2, 16, 4, 32]), torch.Size([2, 4, 16, 16]))
    """
    _check_arguments(query, key, value, valid, bias, key_padding, causal_offset, rate, eps, backend)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    plan, reason = _kernel_plan(query, key, value, valid, bias, key_padding, causal_offset, rate, need_weights, backend)
    if plan is None:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        mask = structured_mask(key_padding, causal_offset, query.shape[2], key.shape[2], query.device)
        if valid is not None:
            mask = valid if mask is None else mask & valid
        return _reference(query, key, value, mask, rate, scaling, eps, dropout, training, bias)

    from hf_sparse_attn.kernels.r_softmax_attention_triton import RSoftmaxAttentionFunction

    key, value, key_padding, rates, causal = plan
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    p_drop = float(dropout) if training else 0.0
    # the kernel's counter-based dropout is keyed by a seed drawn from torch's CPU generator: it follows
    # torch.manual_seed and costs no device sync (the reference's F.dropout draws a different mask, same law)
    seed = int(torch.randint(0, 2**62, ()).item()) if p_drop > 0 else 0
    output = RSoftmaxAttentionFunction.apply(
        q, k, v, key_padding, rates, causal, float(scaling), float(eps), None, p_drop, seed
    )
    return output, None
