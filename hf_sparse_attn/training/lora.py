"""PEFT LoRA for patched models: PEFT's own LoRA targets plus the new LM head's own parameters.

A patched LM head keeps the parameters it adds (PLIF slopes, mixture prior and projections) in a small child
module named ``extra``; the vocabulary-sized weight stays the pretrained, tied one. Training that child in full
(``modules_to_save``) and the attention projections with LoRA gives an adapter that holds only the LoRA matrices
and the head's few new parameters. Putting the whole head in ``modules_to_save`` instead would copy (and untie)
the ``[V, D]`` embedding into every adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from peft import LoraConfig
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import pytorch_utils
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
)

from hf_sparse_attn.architectures import architecture_of

#: PEFT task type per transformers task mapping; PEFT's SEQ_CLS / TOKEN_CLS also train the new classifier in full
_TASK_TYPES = (
    (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, "SEQ_CLS"),
    (MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES, "TOKEN_CLS"),
    (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CAUSAL_LM"),
)


def lora_config(
    model: nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    **kwargs: Any,
) -> LoraConfig:
    """A ``LoraConfig`` for a (patched) BERT, RoBERTa or GPT-2 model.

    - ``target_modules``: unless given, PEFT's own default for the model type
      (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, the table ``get_peft_model`` itself falls back to),
      else the architecture table's ``lora_targets``: GPT-2 ``c_attn`` (a ``Conv1D``, so ``fan_in_fan_out`` is
      set), BERT/RoBERTa ``query``/``value``.
    - ``modules_to_save``: the patched LM head's ``extra`` child (e.g. ``lm_head.extra``), trained in full and
      saved in the adapter; the tied vocabulary weight stays frozen and shared.
    - ``task_type``: from the model class (``SEQ_CLS``, ``TOKEN_CLS``, ``CAUSAL_LM``; none for masked LM), so that
      PEFT also trains the freshly initialised classifier of a classification model.

    Patch the model *before* ``get_peft_model`` and, when reloading, patch the fresh base model before
    ``PeftModel.from_pretrained``: PEFT matches module names, and the head's ``extra`` exists only once patched.

    Args:
        model: the transformers model (not yet wrapped by PEFT).
        r: LoRA rank (>= 1).
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: module names to adapt; defaults to :func:`default_lora_targets`.
        **kwargs: any other ``LoraConfig`` field (e.g. ``bias``, ``use_rslora``).

    Examples::

        >>> patch_model(model, sparsity=0.5, head="moss", num_mixtures=4)
        >>> model = get_peft_model(model, lora_config(model, r=16, alpha=32))
        >>> model.save_pretrained("adapter")  # LoRA matrices + lm_head.extra
    """
    if hasattr(model, "peft_config"):
        raise TypeError(
            "lora_config: model is already a PEFT model; pass the patched transformers model before wrapping"
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1; got {r!r}")
    targets = list(target_modules) if target_modules is not None else default_lora_targets(model)
    conv1d = any(
        isinstance(module, pytorch_utils.Conv1D) and name.rpartition(".")[2] in targets
        for name, module in model.named_modules()
    )
    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    head = model.get_output_embeddings()
    if head is not None and isinstance(getattr(head, "extra", None), nn.Module):
        head_path = next(name for name, module in model.named_modules() if module is head)
        modules_to_save.append(f"{head_path}.extra")
    class_name = type(model).__name__
    task_type = next((task for names, task in _TASK_TYPES if class_name in names.values()), None)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        fan_in_fan_out=conv1d,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
        **kwargs,
    )


def default_lora_targets(model: nn.Module) -> list[str]:
    """The LoRA target module names for ``model``: PEFT's row for its ``model_type`` in
    ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`` (BERT, RoBERTa and GPT-2 all have one), and the
    architecture table's ``lora_targets`` only for a supported type that PEFT has no row for.

    ``TypeError`` for a model that is not a transformers model, ``ValueError`` (listing the supported types) for an
    unsupported ``model_type``.
    """
    fallback = architecture_of(model).lora_targets  # validates the model type
    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type, fallback))
