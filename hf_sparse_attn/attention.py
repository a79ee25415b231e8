"""The r-softmax attention function, registered with transformers' ``AttentionInterface``.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` from
every attention module whose ``config._attn_implementation`` is :data:`ATTENTION_NAME`. The function is
stateless: it reads the layer's rate from ``module.hf_sparse_attn_rate`` (set by ``patch_model``), so layers
can differ although all of them share one implementation name.

Masks (verified on transformers 5.23, see ``docs/transformers-notes.md``): a name registered only with
``AttentionInterface`` receives ``attention_mask=None`` -- no padding and no causal mask -- because
``masking_utils`` skips mask creation for implementations without a mask builder. We therefore also register
:func:`boolean_mask` with ``AttentionMaskInterface``; it always materialises a boolean ``[B, 1, T, S]`` mask
(True = the query may attend the key), never ``None``. The function still accepts every format a model may hand
to it: boolean, additive float (``0`` / large negative, as the eager builder makes), and ``None`` with
``module.is_causal`` (query rows aligned to the *end* of the keys, as under a KV cache in ``generate()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_sparse_attn.kernels import r_softmax_attention

ATTENTION_NAME = "hf_sparse_attn"
#: attribute on each self-attention module holding its rate: None (softmax), a float, or a tensor [H]
RATE_ATTR = "hf_sparse_attn_rate"
#: attribute holding the r-softmax margin epsilon
EPS_ATTR = "hf_sparse_attn_eps"
#: attribute set while the caller needs the probabilities (forces the reference path on CUDA)
WEIGHTS_ATTR = "hf_sparse_attn_need_weights"


def boolean_mask(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Mask builder for :data:`ATTENTION_NAME`: transformers' sdpa builder with both skips disabled, so the
    result is always a boolean ``[B, 1, T, S]`` tensor (True = attend) that the quantile can use."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


def valid_keys(
    attention_mask: torch.Tensor | None, module: nn.Module, query_length: int, key_length: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask broadcastable to the scores ``[B, H, T, S]`` (True = valid key), or None when all are valid."""
    if attention_mask is None:
        if not getattr(module, "is_causal", False) or query_length == 1:
            return None
        # causal without a materialised mask: query i (aligned to the end of the keys) sees keys <= i + S - T
        offset = key_length - query_length
        rows = torch.arange(query_length, device=device)[:, None]
        cols = torch.arange(key_length, device=device)[None, :]
        return cols <= rows + offset  # (T, S)
    if not attention_mask.is_floating_point():
        return attention_mask.bool()
    # additive float mask: 0 where allowed, a very negative number (finfo.min or -inf) where masked
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Softmax over valid keys; masked keys and fully masked rows give exactly 0 (never NaN)."""
    if valid is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1, dtype=torch.float32)
    return probs.masked_fill(~valid, 0.0).to(scores.dtype)


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention with r-softmax (or softmax where the layer's rate is None).

    Args:
        query: ``[B, H, T, D]``; key, value: ``[B, H, S, D]`` (S > T under a KV cache).
        attention_mask: boolean ``[B, 1, T, S]`` (True = attend), additive float, or None (see module docstring).
        scaling: multiplier of ``q·k``; defaults to ``D ** -0.5``.
        dropout: attention dropout probability, applied in training only.

    Returns:
        ``(output [B, T, H, D], probabilities [B, H, T, S] or None)``. The probabilities are returned before
        dropout, so ``output_attentions=True`` shows the r-softmax sparsity pattern itself; the Triton kernel path
        returns None for them unless :func:`returning_weights` is active.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    valid = valid_keys(attention_mask, module, query.shape[-2], key.shape[-2], query.device)
    rate = getattr(module, RATE_ATTR, None)
    if rate is not None:
        return r_softmax_attention(
            query, key, value, valid, rate, scaling=scaling, eps=getattr(module, EPS_ATTR, 1e-8),
            dropout=dropout, training=module.training, need_weights=getattr(module, WEIGHTS_ATTR, False),
        )  # fmt: skip
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, H, T, S)
    probs = masked_softmax(scores, valid)
    dropped = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(dropped.to(value.dtype), value)  # (B, H, T, D)
    return output.transpose(1, 2).contiguous(), probs  # (B, T, H, D)


@contextmanager
def returning_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` returns its probabilities (``output_attentions``
    works on CUDA too, through the reference path)."""
    modules = [m for m in model.modules() if hasattr(m, RATE_ATTR)]
    for module in modules:
        setattr(module, WEIGHTS_ATTR, True)
    try:
        yield
    finally:
        for module in modules:
            delattr(module, WEIGHTS_ATTR)


def register() -> None:
    """Register the attention function and its mask builder under :data:`ATTENTION_NAME` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, boolean_mask)


register()
