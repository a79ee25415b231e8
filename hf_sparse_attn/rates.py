"""Which r-softmax rate a self-attention module runs: the one ``patch_model`` put on it, else the stored patch.

``patch_model`` puts each layer's rate on its self-attention module (:data:`~hf_sparse_attn.attention.RATE_ATTR`,
with the margin epsilon in :data:`~hf_sparse_attn.attention.EPS_ATTR`). A model that plain transformers loaded with
the registered implementation name, e.g. ``AutoModel.from_pretrained(path, attn_implementation="hf_sparse_attn")``
(or the alias ``"r_softmax"``) or ``pipeline(model=path, model_kwargs={"attn_implementation": "r_softmax"})``, has
no such attributes; its modules then run the patch stored in the checkpoint's ``config.json``
(``module.config.hf_sparse_attn``), which transformers keeps on every attention module. That rate is resolved on
the module's first forward and cached on the module, so later calls cost one dict lookup.

Cross-attention modules (BERT/RoBERTa decoders with ``add_cross_attention``) always stay softmax.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from hf_sparse_attn import attention
from hf_sparse_attn.config import CONFIG_KEY, LayerRate, PatchConfig, layer_rates

#: module attribute caching ``(rate, eps)`` resolved from the stored patch (only on modules without a rate)
STORED_RATE_ATTR = "_hf_sparse_attn_stored_rate"
#: the r-softmax margin epsilon when nothing else says otherwise (``PatchConfig.eps``'s default)
DEFAULT_EPS = PatchConfig.__dataclass_fields__["eps"].default

#: A layer's rate as the attention function takes it: None (softmax), a float, or a tensor ``[H]``.
RateValue = None | float | torch.Tensor
#: "no attribute" marker for getattr (None is a valid rate)
_UNSET = object()


def rate_value(rate: LayerRate) -> RateValue:
    """A validated layer rate (``None``, a float or a per-head list) in the form the attention function takes."""
    return torch.tensor(rate) if isinstance(rate, list) else rate


def module_rate(module: nn.Module) -> tuple[RateValue, float]:
    """``(rate, eps)`` of a self-attention module: what ``patch_model`` set on it, else what the model's stored
    patch (``module.config.hf_sparse_attn``) gives its layer, else ``(None, DEFAULT_EPS)`` (softmax).

    Examples::

        >>> model = transformers.AutoModel.from_pretrained(patched_checkpoint, attn_implementation="r_softmax")
        >>> module_rate(model.encoder.layer[0].attention.self)  # the rate config.json stores for layer 0
        (0.5, 1e-08)
    """
    rate = getattr(module, attention.RATE_ATTR, _UNSET)  # getattr, not vars(): torch.compile traces it
    if rate is not _UNSET:
        return rate, getattr(module, attention.EPS_ATTR, DEFAULT_EPS)
    stored = getattr(module, STORED_RATE_ATTR, None)
    if stored is None:
        stored = _stored_rate(module)
        setattr(module, STORED_RATE_ATTR, stored)
    return stored


def clear_stored_rates(model: nn.Module) -> None:
    """Forget the rates cached from a stored patch (after the model's patch or config changed)."""
    for module in model.modules():
        vars(module).pop(STORED_RATE_ATTR, None)


def _stored_head_warning(name_or_path: Any, head: str) -> str:
    """The warning for a checkpoint whose stored LM head a plain transformers load cannot rebuild."""
    where = f" {name_or_path}" if name_or_path else ""
    return (
        f"hf_sparse_attn: the checkpoint{where} was saved with the {head!r} LM head, which a plain transformers "
        f"load cannot rebuild: this model computes its outputs with the plain softmax output layer and the head's "
        f"trained parameters were not loaded. Load it with hf_sparse_attn.from_pretrained(path) instead."
    )


def _stored_rate(module: nn.Module) -> tuple[RateValue, float]:
    config = getattr(module, "config", None)
    data = getattr(config, CONFIG_KEY, None)
    layer = getattr(module, "layer_idx", None)
    if data is None or layer is None or _is_cross_attention(module):
        return None, DEFAULT_EPS
    patch = PatchConfig.from_dict(data)
    if patch.head_name != "softmax":
        warnings.warn(
            _stored_head_warning(getattr(config, "name_or_path", ""), patch.head_name), UserWarning, stacklevel=3
        )
    return rate_value(layer_rates(patch.sparsity, config.num_hidden_layers)[layer]), patch.eps


def _is_cross_attention(module: nn.Module) -> bool:
    # GPT-2 flags its cross-attention modules; BERT/RoBERTa use a separate *CrossAttention class
    return bool(getattr(module, "is_cross_attention", False)) or type(module).__name__.endswith("CrossAttention")
