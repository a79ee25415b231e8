"""Measure what r-softmax did: the fraction of exact zeros among valid keys, per layer.

A key is *valid* for a query when it is not padding and, in a causal model, not in the future -- the same
positions r-softmax takes its quantile over. Rows of padded queries are left out of the average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hf_sparse_attn.architectures import is_causal
from hf_sparse_attn.attention import returning_weights


def attention_sparsity(
    attentions: Sequence[torch.Tensor], attention_mask: torch.Tensor | None = None, *, causal: bool = False
) -> list[float]:
    """Per-layer mean fraction of exact zeros among valid keys.

    Args:
        attentions: one ``[B, H, T, T]`` tensor per layer, as returned with ``output_attentions=True``.
        attention_mask: ``[B, T]`` padding mask (1 = token, 0 = padding), or None for no padding.
        causal: whether keys after the query are invalid (GPT-2, BERT with ``is_decoder``).

    Returns:
        One float per layer in [0, 1]: the zero fraction of each valid query row, averaged over rows and heads.

    Examples::

        >>> out = model(**batch, output_attentions=True)
        >>> attention_sparsity(out.attentions, batch["attention_mask"])
        [0.49, 0.5, ...]
    """
    if not attentions:
        raise ValueError("attentions is empty: run the model with output_attentions=True")
    batch, _, queries, keys = attentions[0].shape
    device = attentions[0].device
    token = (
        torch.ones(batch, keys, dtype=torch.bool, device=device)
        if attention_mask is None
        else attention_mask.to(device=device, dtype=torch.bool)
    )
    valid = token[:, None, None, :].expand(batch, 1, queries, keys)  # (B, 1, T, S)
    if causal:
        valid = valid & torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)
    rows = token[:, -queries:][:, None, :].float()  # (B, 1, T): weight of each query row
    counts = valid.sum(-1).clamp(min=1).float()  # (B, 1, T)
    result = []
    for layer in attentions:
        zeros = ((layer == 0) & valid).sum(-1).float() / counts  # (B, H, T)
        weights = rows.expand_as(zeros)
        result.append(float((zeros * weights).sum() / weights.sum().clamp(min=1)))
    return result


@torch.no_grad()
def measure_sparsity(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> list[float]:
    """Run ``model`` on ``batch`` (no gradient, current train/eval mode kept) and return
    :func:`attention_sparsity` per layer."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
    with returning_weights(model):
        outputs = model(**inputs, output_attentions=True)
    return attention_sparsity(outputs.attentions, batch.get("attention_mask"), causal=is_causal(model))
