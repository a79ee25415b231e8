"""`patch_model`, `unpatch_model`, `set_sparsity` and `from_pretrained`.

``patch_model`` validates a :class:`~hf_sparse_attn.config.PatchConfig`, switches the model's attention
implementation to ours, puts each layer's rate on its self-attention module, swaps the LM head, and writes
the config into ``model.config`` so that ``save_pretrained`` / ``push_to_hub`` carry it. Only the given
instance is changed; classes and other models are untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from hf_sparse_attn import attention, heads, hub
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.config import CONFIG_KEY, PatchConfig, Sparsity, layer_rates

#: attribute on the model remembering the attention implementation it had before patching
_ORIGINAL_IMPL_ATTR = "_hf_sparse_attn_original_impl"


def get_patch_config(model: nn.Module) -> PatchConfig | None:
    """The patch applied to ``model`` (read from ``model.config``), or None."""
    data = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return None if data is None else PatchConfig.from_dict(data)


def patch_model(model: nn.Module, sparsity: Sparsity = None, head: str | None = None, **head_options: Any) -> nn.Module:
    """Put r-softmax into every self-attention layer of ``model`` and optionally swap its LM head.

    Patches in place and returns ``model``. Calling it again replaces the previous patch (it describes the
    whole desired state; an unchanged head keeps its trained parameters). ``unpatch_model`` undoes it.

    Args:
        model: a transformers BERT, RoBERTa or GPT-2 model (any task head).
        sparsity: the r-softmax rate r: fraction of *valid* keys per query row set to exactly 0. A float in
            [0, 1] for every layer; ``None`` keeps softmax; a per-layer list (``None`` entries keep softmax; an
            entry may be a per-head list or tensor ``[num_heads]``); or ``{layer_index: rate}``.
        head: ``None``/``"softmax"`` (unchanged), ``"sigsoftmax"``, ``"mos"``, ``"moss"`` or ``"plif"``; needs a
            model with an LM head (causal or masked LM).
        **head_options: ``num_mixtures`` (mos/moss), ``num_knots`` and ``knot_range`` (plif), ``eps``.

    Examples::

        >>> model = AutoModelForSequenceClassification.from_pretrained("roberta-base", num_labels=2)
        >>> patch_model(model, sparsity=0.5)
        >>> lm = patch_model(AutoModelForCausalLM.from_pretrained("gpt2"), sparsity=[None] * 6 + [0.5] * 6,
        ...                  head="moss", num_mixtures=4)
    """
    allowed = {"num_mixtures", "num_knots", "knot_range", "eps"}
    unknown = sorted(set(head_options) - allowed)
    if unknown:
        raise TypeError(f"patch_model() got unexpected option(s) {unknown}; allowed: {sorted(allowed)}")
    config = PatchConfig(sparsity=sparsity, head=head, **head_options)
    modules = self_attention_modules(model)  # validates the model type
    rates = layer_rates(config.sparsity, len(modules))
    output_layer = model.get_output_embeddings()
    if config.head_name != "softmax" and not isinstance(output_layer, nn.Linear):
        raise ValueError(
            f"head={config.head!r} needs a model with an LM head (causal or masked LM); "
            f"{type(model).__name__} has none. Use head=None for this model."
        )
    _check_per_head(rates, model)

    if not hasattr(model, _ORIGINAL_IMPL_ATTR):
        setattr(model, _ORIGINAL_IMPL_ATTR, model.config._attn_implementation)
    attention.register()
    model.set_attn_implementation(attention.ATTENTION_NAME)
    _set_rates(modules, rates, config.eps)
    if isinstance(output_layer, nn.Linear):
        _swap_head(model, output_layer, config)
    setattr(model.config, CONFIG_KEY, config.to_dict())
    hub.bind_push_to_hub(model)  # so model.push_to_hub(...) uploads our model card with the weights
    return model


def set_sparsity(model: nn.Module, sparsity: Sparsity) -> None:
    """Change the r-softmax rates of a patched model (e.g. from a schedule) without touching its head.

    Accepts the same forms as ``patch_model``'s ``sparsity`` and records them in ``model.config``.
    """
    config = get_patch_config(model)
    if config is None:
        raise ValueError("set_sparsity: the model is not patched; call hf_sparse_attn.patch_model(model, ...) first")
    config.sparsity = sparsity
    config.__post_init__()  # validate
    modules = self_attention_modules(model)
    rates = layer_rates(config.sparsity, len(modules))
    _check_per_head(rates, model)
    _set_rates(modules, rates, config.eps)
    getattr(model.config, CONFIG_KEY)["sparsity"] = config.sparsity


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: the original attention implementation, softmax everywhere and the original LM head
    (sharing the same weight Parameters). Returns ``model``."""
    if get_patch_config(model) is None:
        raise ValueError("unpatch_model: the model is not patched by hf_sparse_attn")
    for module in self_attention_modules(model):
        for name in (attention.RATE_ATTR, attention.EPS_ATTR):
            if hasattr(module, name):
                delattr(module, name)
    output_layer = model.get_output_embeddings()
    if isinstance(output_layer, nn.Linear):
        _replace_module(model, output_layer, heads.restore_linear(output_layer))
    hub.unbind_push_to_hub(model)
    model.set_attn_implementation(getattr(model, _ORIGINAL_IMPL_ATTR))
    delattr(model, _ORIGINAL_IMPL_ATTR)
    if hasattr(model, "_hf_sparse_attn_head"):
        del model._hf_sparse_attn_head
    delattr(model.config, CONFIG_KEY)
    return model


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a checkpoint saved from a patched model and return it patched again, with its head parameters.

    The class is the one recorded in ``config.json`` (``architectures[0]``), so a sequence classifier comes back
    as a sequence classifier. A checkpoint without a patch loads as the plain model. ``kwargs`` go to the class's
    ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ``dtype``, ``num_labels``, ...).

    Examples::

        >>> model.save_pretrained("ckpt")
        >>> again = hf_sparse_attn.from_pretrained("ckpt")
    """
    config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"{pretrained_model_name_or_path}: config.json names no transformers model class in `architectures` "
            f"({architectures!r}); load it with the right AutoModel class and call hf_sparse_attn.patch_model"
        )
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    patch = PatchConfig.from_dict(data)
    # the head's own parameters are not in the plain class: transformers would report them as unexpected keys,
    # which we load ourselves just below, so silence that report
    with _quiet_transformers():
        model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    before = set(model.state_dict())
    patch_model(model, **{k: v for k, v in patch.to_dict().items() if k != "version"})
    added = sorted(set(model.state_dict()) - before)
    if added:
        _load_tensors(model, pretrained_model_name_or_path, added, kwargs)
    return model


def _check_per_head(rates: list, model: nn.Module) -> None:
    num_heads = model.config.num_attention_heads
    for index, rate in enumerate(rates):
        if isinstance(rate, list) and len(rate) != num_heads:
            raise ValueError(
                f"sparsity[{index}]: a per-head rate needs one value per attention head ({num_heads}); got {len(rate)}"
            )


def _set_rates(modules: list[nn.Module], rates: list, eps: float) -> None:
    for module, rate in zip(modules, rates, strict=True):
        setattr(module, attention.RATE_ATTR, torch.tensor(rate) if isinstance(rate, list) else rate)
        setattr(module, attention.EPS_ATTR, eps)


def _swap_head(model: nn.Module, output_layer: nn.Linear, config: PatchConfig) -> None:
    current = getattr(model, "_hf_sparse_attn_head", None)
    wanted = (config.head_name, tuple(sorted(config.head_options().items())))
    if current == wanted:
        return  # same head and options: keep its (possibly trained) parameters
    new = heads.build_head(config.head_name, heads.restore_linear(output_layer), **config.head_options())
    _replace_module(model, output_layer, new)
    model._hf_sparse_attn_head = wanted


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    if old is new:
        return
    path = next(name for name, module in model.named_modules() if module is old)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder", "proxies")
    return {k: kwargs[k] for k in names if k in kwargs}


def _load_tensors(model: nn.Module, path: str | os.PathLike, names: list[str], kwargs: dict[str, Any]) -> None:
    """Read ``names`` from the checkpoint's safetensors file(s) into ``model``."""
    hub = _hub_kwargs(kwargs)
    index_file = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index_file is not None:
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        shards = {weight_map[name] for name in names if name in weight_map}
    else:
        shards = {"model.safetensors"}
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(shards):
        with safe_open(cached_file(path, shard, **hub), framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in names if name in f.keys()})  # noqa: SIM118
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks the patched head's parameters {missing}")
    model.load_state_dict(found, strict=False)


class _quiet_transformers:
    """Context manager lowering transformers' log level to errors."""

    def __enter__(self) -> None:
        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc: object) -> None:
        hf_logging.set_verbosity(self._level)
