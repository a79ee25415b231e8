"""Where things live in each supported architecture: one row per ``model_type``.

Adding an architecture is one row here. Paths are attribute paths relative to the model's base model
(``model.base_model``: ``bert`` / ``roberta`` / ``transformer``), so every task head of an architecture
(base model, sequence / token classification, masked LM, causal LM, double heads) is covered by its row.
The LM head is found generically through ``model.get_output_embeddings()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """One supported ``model_type``.

    Args:
        layers: path of the ``nn.ModuleList`` of transformer blocks inside the base model.
        self_attention: path of the self-attention module inside one block (the module transformers passes
            to the attention function).
        causal: whether self-attention is causal (decoder-only); encoders become causal when
            ``config.is_decoder`` is set.
        lora_targets: default LoRA target module names, used only where PEFT's own table
            (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``) has no row for this model type.
    """

    layers: str
    self_attention: str
    causal: bool
    lora_targets: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "bert": Architecture("encoder.layer", "attention.self", causal=False, lora_targets=("query", "value")),
    "roberta": Architecture("encoder.layer", "attention.self", causal=False, lora_targets=("query", "value")),
    "gpt2": Architecture("h", "attn", causal=True, lora_targets=("c_attn",)),
}


def architecture_of(model: nn.Module) -> Architecture:
    """The table row for ``model``; ``TypeError`` for a non-transformers model, ``ValueError`` for another type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or not hasattr(model, "base_model"):
        hint = " (patch the base model before wrapping it with PEFT)" if hasattr(model, "peft_config") else ""
        raise TypeError(
            f"model must be a transformers PreTrainedModel (BERT, RoBERTa or GPT-2); got {type(model).__name__}{hint}"
        )
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every layer, in layer order."""
    arch = architecture_of(model)
    layers = model.base_model.get_submodule(arch.layers)
    return [layer.get_submodule(arch.self_attention) for layer in layers]


def is_causal(model: nn.Module) -> bool:
    """Whether the model's self-attention only sees past positions."""
    return architecture_of(model).causal or bool(getattr(model.config, "is_decoder", False))
