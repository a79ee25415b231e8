"""Dispatcher for r-softmax attention: the Triton kernel where it applies, the reference everywhere else.

Kernels are an optimisation, never a requirement (DESIGN §3): Triton is imported only when the kernel path is
taken, so this module works without Triton installed. Both paths compute the same function (the kernel is tested
against the reference at fp32 tolerance); the reference is :func:`hf_sparse_attn.ops.r_softmax` on the
materialised ``[B, H, T, S]`` scores ``(scaling q) kᵀ + bias``. Scaling ``q`` before the product keeps fp16 scores
finite wherever the scaled scores fit in fp16, as in SDPA (``q·k`` itself may overflow).

The kernel covers masks made of per-(batch, key) padding and an optional causal pattern with queries aligned to
the end of the keys (query ``i`` sees key ``j`` iff ``j <= i + S - T``, as under a KV cache), one rate per head
(or one for all), fp16/bf16/fp32, head dims 16/32/64/128, no attention dropout in training, no returned weights,
no additive bias at valid keys. The dispatcher recognises such a mask from the materialised boolean mask
transformers builds. Nothing here hides a NaN: a NaN score at a valid key gives a NaN row on every path.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from numbers import Real

import torch
import torch.nn.functional as F

from hf_sparse_attn.ops.r_softmax import r_softmax

__all__ = ["kernel_unsupported_reason", "r_softmax_attention", "triton_available"]

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = (16, 32, 64, 128)
#: set to 0 to make backend="auto" always use the reference (an escape hatch, e.g. to bisect a numerical issue)
KERNELS_ENV = "HF_SPARSE_ATTN_KERNELS"


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _rates_per_head(rate: float | torch.Tensor, heads: int, device: torch.device) -> torch.Tensor | None:
    """fp32 ``[H]`` rates on ``device``, or None when ``rate`` differs within a head (per batch or per row)."""
    if not isinstance(rate, torch.Tensor):
        return torch.full((heads,), float(rate), dtype=torch.float32, device=device)
    if rate.numel() == 1:
        return rate.detach().reshape(1).to(device, torch.float32).expand(heads).contiguous()
    if rate.numel() == heads and (rate.dim() == 1 or rate.shape[-3:] == (heads, 1, 1)):
        return rate.detach().reshape(heads).to(device, torch.float32).contiguous()
    return None


def _split_mask(
    valid: torch.Tensor | None, batch: int, t_len: int, s_len: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Candidate decomposition of a bool mask broadcastable to ``[B, 1, T, S]`` into key padding and causality.

    Returns ``(key_padding [B', S], is_padding, is_causal)``: the last query row of the mask (it sees every key
    under both patterns) as the padding candidate, and 0-d bool tensors saying whether the mask equals that
    padding alone or that padding combined with the causal pattern (offset ``S - T``). ``(None, None, None)``
    when the mask has a shape the kernel cannot take (per-head masks, more than 4 dims).
    """
    if valid is None:
        return None, torch.tensor(True, device=device), torch.tensor(False, device=device)
    if valid.dim() > 4:
        return None, None, None
    mask = valid.reshape((1,) * (4 - valid.dim()) + tuple(valid.shape))  # (B', 1, T', S')
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch):
        return None, None, None
    mask = mask[:, 0].expand(mask.shape[0], t_len, s_len)  # (B', T, S)
    padding = mask[:, -1, :]  # (B', S)
    rows = torch.arange(t_len, device=mask.device)[:, None]
    cols = torch.arange(s_len, device=mask.device)[None, :]
    causal = padding[:, None, :] & (cols <= rows + (s_len - t_len))  # (B', T, S)
    return padding, (mask == padding[:, None, :]).all(), (mask == causal).all()


def kernel_unsupported_reason(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout: float = 0.0,
    training: bool = False,
    need_weights: bool = False,
) -> str | None:
    """Why the Triton kernel cannot run this call (static checks only, no device sync), or None if it can.

    The mask and the rate are checked later, in :func:`r_softmax_attention`, with one device sync."""
    if query.dtype not in KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}; the kernel needs one of {KERNEL_DTYPES} for all"
    if query.shape[-1] not in KERNEL_HEAD_DIMS or value.shape[-1] != query.shape[-1]:
        return f"head dim {query.shape[-1]} (value {value.shape[-1]}); the kernel supports {KERNEL_HEAD_DIMS}"
    if key.shape[:2] != query.shape[:2] or value.shape[:3] != key.shape[:3]:
        return f"key/value shapes {tuple(key.shape)}/{tuple(value.shape)} need the [B, H] of query (no GQA)"
    if training and dropout > 0:
        return f"attention dropout {dropout} in training"
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
    if rate is None or isinstance(rate, bool) or not isinstance(rate, Real | torch.Tensor):
        raise TypeError(f"rate must be a number in [0, 1] or a tensor of rates (None means softmax); got {rate!r}")
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0.0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")


def _kernel_plan(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None,
    rate: float | torch.Tensor,
    dropout: float,
    training: bool,
    need_weights: bool,
    backend: str,
    bias: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor | None, torch.Tensor, bool] | None, str | None]:
    """``((key_padding [B, S] or None, rates [H], causal), None)`` when the kernel can run the call, else
    ``(None, reason)``. Raises ``ValueError`` for rates outside [0, 1] (checked in the same device sync)."""
    if backend == "reference" or (backend == "auto" and os.environ.get(KERNELS_ENV) == "0"):
        return None, "the reference backend was requested"
    if backend == "auto" and not query.is_cuda:
        return None, f"tensors are on {query.device.type}, not CUDA"
    reason = kernel_unsupported_reason(query, key, value, dropout, training, need_weights)
    if reason is not None:
        return None, reason
    rates = _rates_per_head(rate, query.shape[1], query.device)
    if rates is None:
        return None, f"rate of shape {tuple(rate.shape)} is not one value per head"
    padding, is_padding, is_causal = _split_mask(valid, query.shape[0], query.shape[2], key.shape[2], query.device)
    if is_padding is None:
        return None, f"mask of shape {tuple(valid.shape)} is not a [B, 1, T, S] padding/causal mask"
    all_valid = padding.all() if padding is not None else is_padding
    in_range = ((rates >= 0) & (rates <= 1)).all()
    no_bias = is_padding.new_ones(())
    if bias is not None:  # an additive mask that is 0 at every valid key is a plain mask; biases and NaN are not
        no_bias = (bias.eq(0) if valid is None else bias.eq(0) | ~valid).all()
    flags = torch.stack([is_padding, is_causal, all_valid, in_range, no_bias]).tolist()
    only_padding, causal, all_valid, in_range, no_bias = flags
    if not in_range:
        raise ValueError(f"rate must lie in [0, 1]; got {rate!r}")
    if not no_bias:
        return None, "the additive mask adds non-zero values (biases) at valid keys"
    if not (only_padding or causal):
        return None, "the mask is neither key padding nor key padding + causal (offset S - T)"
    # a mask matching both patterns (T = 1 under a KV cache) takes the cheaper non-causal path
    key_padding = None if all_valid else padding.expand(query.shape[0], key.shape[2])  # (B, S), maybe stride 0
    return (key_padding, rates, not only_padding), None


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with r-softmax: ``o = r_softmax(scaling q k^T + bias, rate, mask=valid) v``.

    Each query row keeps the keys whose score exceeds the r-quantile of its *valid* scores (DESIGN §2): a
    fraction ``rate`` of the valid keys gets weight exactly 0, masked keys get 0 and do not enter the quantile, and
    a row with no valid key gives a zero output. ``backend="auto"`` runs the flash-style Triton kernel (no
    ``[T, S]`` matrix in memory) when :func:`kernel_unsupported_reason` finds nothing against it and the mask is
    key padding plus an optional causal pattern; otherwise the reference, which gives the same numbers.

    Args:
        query: ``[B, H, T, D]``.
        key, value: ``[B, H, S, D]`` (``S > T`` under a KV cache).
        valid: bool mask broadcastable to ``[B, 1, T, S]`` (True = the query may attend the key), e.g. the
            ``[B, 1, T, S]`` mask transformers builds or a ``[T, S]`` causal mask; None = every key is valid.
        rate: sparsity rate in ``[0, 1]``: a number, a tensor ``[H]`` (one per head), or for the reference any
            tensor broadcastable to ``[B, H, T, 1]``.
        scaling: multiplier of ``q·k``; defaults to ``D ** -0.5``.
        eps: r-softmax margin epsilon (> 0).
        dropout, training: attention dropout probability, applied to the probabilities when ``training``.
        need_weights: the caller needs the ``[B, H, T, S]`` probabilities (forces the reference path).
        bias: optional float tensor broadcastable to ``[B, H, T, S]`` added to the scaled scores, e.g. the additive
            mask of eager attention (its entries at keys that ``valid`` masks are ignored, whatever they hold).
        backend: ``"auto"``, ``"triton"`` (raise ``ValueError`` when the kernel cannot run the call) or
            ``"reference"``.

    Returns:
        ``(output [B, T, H, D], probabilities [B, H, T, S] before dropout)`` from the reference path, ``(output,
        None)`` from the kernel, which never materialises them.

    Examples::
        >>> q, k, v = (torch.randn(2, 4, 16, 32) for _ in range(3))
        >>> causal = torch.ones(16, 16, dtype=torch.bool).tril()
        >>> out, weights = r_softmax_attention(q, k, v, causal, rate=0.5)  # on CPU: the reference path
        >>> out.shape, weights.shape
        (torch.Size([2, 16, 4, 32]), torch.Size([2, 4, 16, 16]))
    """
    _check_arguments(query, key, value, valid, bias, rate, eps, backend)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    plan, reason = _kernel_plan(query, key, value, valid, rate, dropout, training, need_weights, backend, bias)
    if plan is None:
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
        return _reference(query, key, value, valid, rate, scaling, eps, dropout, training, bias)

    from hf_sparse_attn.kernels.r_softmax_attention_triton import RSoftmaxAttentionFunction

    key_padding, rates, causal = plan
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    return RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rates, causal, float(scaling), float(eps)), None
