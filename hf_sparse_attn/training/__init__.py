"""The training side: Trainer callbacks, the recipes' data and setup, LoRA targets, metrics, perplexity and plots.

- :mod:`~hf_sparse_attn.training.callbacks`: :class:`SparsityScheduleCallback` (warm-up of the r-softmax rate),
  :class:`SparsityLoggingCallback` (per-layer sparsity in the logs), :func:`add_first`; re-exported here.
- :mod:`~hf_sparse_attn.training.data`: GLUE and text corpora through ``datasets`` for the recipes.
- :mod:`~hf_sparse_attn.training.recipe`: the recipes' argument dataclasses, model loading, patching and stages.
- :mod:`~hf_sparse_attn.training.lora`: a PEFT ``LoraConfig`` that targets the patched model's modules.
- :mod:`~hf_sparse_attn.training.metrics`: GLUE and perplexity ``evaluate`` modules that ship with the package.
- :mod:`~hf_sparse_attn.training.perplexity`: sliding-window perplexity of a causal LM on a text.
- :mod:`~hf_sparse_attn.training.plots`: loss, metric and sparsity curves from ``trainer_state.json``.

The callbacks import torch and transformers, so they are imported on first use (PEP 562): the light modules of this
package (``plots``) do not load them.

Examples::

    >>> from hf_sparse_attn.training import SparsityLoggingCallback, SparsityScheduleCallback, add_first
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hf_sparse_attn.training.callbacks import (
        LOG_PREFIX,
        AdapterPatchCallback,
        SparsityLoggingCallback,
        SparsityScheduleCallback,
        add_first,
        scheduled_sparsity,
        unwrap_model,
    )


def __getattr__(name: str) -> Any:
    """A name of ``__all__``, imported from :mod:`hf_sparse_attn.training.callbacks` on first use."""
    if name not in __all__:
        raise AttributeError(f"module 'hf_sparse_attn.training' has no attribute {name!r}")
    value = getattr(importlib.import_module("hf_sparse_attn.training.callbacks"), name)
    globals()[name] = value
    return value


#: public names re-exported from :mod:`hf_sparse_attn.training.callbacks`
__all__ = [
    "LOG_PREFIX",
    "AdapterPatchCallback",
    "SparsityLoggingCallback",
    "SparsityScheduleCallback",
    "add_first",
    "scheduled_sparsity",
    "unwrap_model",
]
