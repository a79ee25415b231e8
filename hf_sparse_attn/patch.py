"""`patch_model`, `unpatch_model`, `set_sparsity` and `from_pretrained`.

``patch_model`` validates a :class:`~hf_sparse_attn.config.PatchConfig`, switches the model's attention
implementation to ours, puts each layer's rate on its self-attention module, swaps the LM head, and writes
the config into ``model.config`` so that ``save_pretrained`` / ``push_to_hub`` carry it. Only the given
instance is changed; classes and other models are untouched.

One source of truth: whether a model is patched, and how, is a property of the *instance*
(``get_patch_config``), set by ``patch_model`` / ``set_sparsity`` and cleared by ``unpatch_model``. The
``hf_sparse_attn`` entry of ``model.config`` is only its serialisation. A model that plain transformers loaded from
a patched checkpoint carries the entry but is not patched: ``get_patch_config`` and ``set_sparsity`` raise and name
the fix, ``unpatch_model`` drops the entry. ``patch_model`` gives the model its own copy of its config (and points
every submodule holding the old object at the copy), so models built from one shared config object never change
each other's attention or saved checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import types
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.utils import cached_file, find_adapter_config_file
from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

from hf_sparse_attn import attention, fused_loss, heads
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.config import CONFIG_KEY, PatchConfig, Sparsity, layer_rates
from hf_sparse_attn.publishing import hub
from hf_sparse_attn.rates import clear_stored_rates, rate_value

#: attribute on the model remembering the attention implementation it had before patching
_ORIGINAL_IMPL_ATTR = "_hf_sparse_attn_original_impl"
#: attribute on the model holding the :class:`PatchConfig` applied to this instance
_PATCH_ATTR = "_hf_sparse_attn_patch"
#: attribute on the model naming its current head and options (an unchanged head keeps its parameters)
_HEAD_ATTR = "_hf_sparse_attn_head"
#: the attention implementation names that are ours
_OUR_IMPLEMENTATIONS = (attention.ATTENTION_NAME, attention.ATTENTION_ALIAS)
#: file written beside a PEFT adapter saved from a patched model (PEFT saves no ``config.json``): the keyword
#: arguments of ``patch_model`` that rebuild the patched base; :func:`from_pretrained` of the adapter folder applies it
PATCH_FILE = "hf_sparse_attn_patch.json"
#: the transformers auto class of an adapter's base model per PEFT ``task_type``, as PEFT's ``AutoPeftModelFor*``
#: classes pick it (an adapter without a task type names its base class in ``auto_mapping`` instead)
_ADAPTER_BASE_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def get_patch_config(model: nn.Module) -> PatchConfig | None:
    """The patch applied to this instance by :func:`patch_model` (a copy), or None for an unpatched model.

    Read from the instance, not from ``model.config``: a model that plain transformers loaded from a patched
    checkpoint carries the ``hf_sparse_attn`` config entry without running it, and gets a ``ValueError`` that names
    the fix (load with :func:`hf_sparse_attn.from_pretrained`, or ``patch_model`` / ``unpatch_model`` it). A PEFT
    model is read through its base model.
    """
    model = _base_model(model)
    patch = vars(model).get(_PATCH_ATTR)
    if patch is not None:
        return copy.deepcopy(patch)
    _raise_if_stored_only(model, "get_patch_config")
    return None


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
    # validate everything and build what is new before changing anything: a failed call leaves the model as it was
    config = PatchConfig(sparsity=sparsity, head=head, **head_options)
    modules = self_attention_modules(model)  # validates the model type
    rates = _resolve_rates(model, config, len(modules))
    output_layer = model.get_output_embeddings()
    if config.head_name != "softmax" and not isinstance(output_layer, nn.Linear):
        raise ValueError(
            f"head={config.head!r} needs a model with an LM head (causal or masked LM); "
            f"{type(model).__name__} has none. Use head=None for this model."
        )
    new_head = _new_head(model, output_layer, config) if isinstance(output_layer, nn.Linear) else None
    attention.register()

    _own_config(model)
    if _ORIGINAL_IMPL_ATTR not in vars(model):
        original = model.config._attn_implementation
        # a plain load with our name (attn_implementation="hf_sparse_attn") had SDPA as transformers' default
        setattr(model, _ORIGINAL_IMPL_ATTR, "sdpa" if original in _OUR_IMPLEMENTATIONS else original)
    model.set_attn_implementation(attention.ATTENTION_NAME)
    _set_rates(modules, rates, config.eps)
    if new_head is not None:
        _replace_module(model, output_layer, new_head)
        setattr(model, _HEAD_ATTR, _head_key(config))
    fused_loss.enable_fused_loss(model)  # training with labels: the head loss without [tokens x V] logits
    _record(model, config)
    model.add_model_tags(hub.model_tags(rates, config))  # on the card of model.push_to_hub / Trainer.push_to_hub
    model.resize_token_embeddings = types.MethodType(_resize_token_embeddings, model)  # keeps the head
    return model


def set_sparsity(model: nn.Module, sparsity: Sparsity) -> None:
    """Change the r-softmax rates of a patched model (e.g. from a schedule) without touching its head.

    Accepts the same forms as ``patch_model``'s ``sparsity`` and records them in ``model.config``. Raises
    ``ValueError`` for a model that is not patched, including one that plain transformers loaded from a patched
    checkpoint (it carries the config entry but does not run it). A PEFT model is changed through its base model.
    """
    model = _base_model(model)
    patch = _patch_of(model, "set_sparsity")
    config = dataclasses.replace(patch, sparsity=sparsity)  # validates
    modules = self_attention_modules(model)
    rates = _resolve_rates(model, config, len(modules))
    _own_config(model)
    _set_rates(modules, rates, config.eps)
    _record(model, config)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model``: the original attention implementation, softmax everywhere and the original LM head
    (sharing the same weight Parameters). Returns ``model``.

    On a model that plain transformers loaded from a patched checkpoint (not patched, but its config carries the
    ``hf_sparse_attn`` entry) it drops that entry and our attention implementation, so the model is plain and saves
    as plain. Raises ``ValueError`` for a model with neither.
    """
    if _PATCH_ATTR not in vars(model) and getattr(model.config, CONFIG_KEY, None) is None:
        raise ValueError("unpatch_model: the model is not patched by hf_sparse_attn")
    modules = self_attention_modules(model)
    _own_config(model)
    for module in modules:
        for name in (attention.RATE_ATTR, attention.EPS_ATTR):
            vars(module).pop(name, None)
    clear_stored_rates(model)
    output_layer = model.get_output_embeddings()
    if isinstance(output_layer, nn.Linear):
        _replace_module(model, output_layer, heads.restore_linear(output_layer))
    hub.remove_model_tags(model)
    fused_loss.disable_fused_loss(model)
    vars(model).pop("resize_token_embeddings", None)
    original = vars(model).pop(_ORIGINAL_IMPL_ATTR, None)
    if original is None and model.config._attn_implementation in _OUR_IMPLEMENTATIONS:
        original = "sdpa"  # loaded with attn_implementation="hf_sparse_attn": transformers' default instead
    if original is not None:
        model.set_attn_implementation(original)
    for name in (_HEAD_ATTR, _PATCH_ATTR):
        vars(model).pop(name, None)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a checkpoint or PEFT adapter saved from a patched model and return it patched again, with its head
    parameters.

    The class is the one recorded in ``config.json`` (``architectures[0]``), so a sequence classifier comes back
    as a sequence classifier. A checkpoint without a patch loads as the plain model. ``kwargs`` go to the class's
    ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ``dtype``, ``num_labels``, ``variant``, ...).

    A folder or Hub repo holding ``adapter_config.json`` is a PEFT adapter and comes back as the patched
    ``PeftModel``: the base model named by the adapter's ``base_model_name_or_path`` (at its ``revision``) is loaded
    as above, with the class PEFT's ``task_type`` implies (``CAUSAL_LM`` -> ``AutoModelForCausalLM``, ``SEQ_CLS`` ->
    ``AutoModelForSequenceClassification``, ...; without a task type, the class PEFT recorded in ``auto_mapping``),
    patched with the options of :data:`PATCH_FILE` beside the adapter (the recipes write it; a base that is itself
    a patched checkpoint needs none), then ``PeftModel.from_pretrained`` loads the LoRA matrices and the head's own
    trained parameters (``modules_to_save``). Patching before loading matters: on an unpatched base PEFT skips the
    head's ``extra`` module without an error. For an adapter, ``revision``, ``subfolder`` and the PEFT options
    ``adapter_name`` and ``is_trainable`` apply to the adapter; ``token``, ``cache_dir``, ``local_files_only``,
    ``force_download`` and ``proxies`` to both; every other keyword (``num_labels``, ``dtype``, ...) to the base.

    transformers' load report is kept, minus the head's own parameters (a plain class does not have them, so
    transformers lists them as unexpected; they are loaded here from the weights file transformers reads:
    ``model.safetensors`` when present, else the shards named by ``model.safetensors.index.json``). Missing base
    weights, other unexpected keys and size mismatches are still reported.

    Examples::

        >>> model.save_pretrained("ckpt")
        >>> again = hf_sparse_attn.from_pretrained("ckpt")
        >>> peft_model = hf_sparse_attn.from_pretrained("out")  # a `--lora` recipe run: PeftModel, patched
    """
    adapter = find_adapter_config_file(str(pretrained_model_name_or_path), **_hub_kwargs(kwargs))
    if adapter is not None:
        return _from_adapter(pretrained_model_name_or_path, adapter, kwargs)
    return _from_checkpoint(pretrained_model_name_or_path, None, kwargs)


def save_adapter_patch(model: nn.Module, save_directory: str | os.PathLike) -> str | None:
    """Write the patch of ``model`` as :data:`PATCH_FILE` in ``save_directory``, beside the PEFT adapter saved there,
    so that :func:`from_pretrained` of the folder rebuilds the patched base before loading the adapter (PEFT saves
    the adapter config, not the base's ``config.json`` that carries the patch of a full checkpoint).

    The file holds ``patch_model``'s keyword arguments (``{"sparsity": 0.5, "head": "moss", ...}``). Returns its path,
    or None for a model that is not patched (nothing to write). ``model`` is the PEFT model or its patched base.

    Examples::

        >>> peft_model.save_pretrained("adapter")
        >>> save_adapter_patch(peft_model, "adapter")
        >>> again = hf_sparse_attn.from_pretrained("adapter")  # PeftModel on the patched base
    """
    config = get_patch_config(model)
    if config is None:
        return None
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, PATCH_FILE)
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.to_dict().items() if k != "version"}, f, indent=2)
    return path


def _from_checkpoint(
    pretrained_model_name_or_path: str | os.PathLike, model_class: Any, kwargs: dict[str, Any]
) -> nn.Module:
    """:func:`from_pretrained` of a full checkpoint, as ``model_class`` (a transformers model or auto class) or, when
    None, as the class ``config.json`` records."""
    config = transformers.AutoConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
    architectures = getattr(config, "architectures", None) or []
    if model_class is None and architectures:
        model_class = getattr(transformers, architectures[0], None)
    if model_class is None:
        raise ValueError(
            f"{pretrained_model_name_or_path}: config.json names no transformers model class in `architectures` "
            f"({architectures!r}); load it with the right AutoModel class and call hf_sparse_attn.patch_model"
        )
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    patch = PatchConfig.from_dict(data)
    want_info = kwargs.pop("output_loading_info", False)
    with _HeldLoadReport() as held:  # re-emitted below without the head's keys (or as is if loading fails)
        model, info = model_class.from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        before = set(model.state_dict())
        patch_model(model, **{k: v for k, v in patch.to_dict().items() if k != "version"})
        added = sorted(set(model.state_dict()) - before)
        if added:
            _load_tensors(model, pretrained_model_name_or_path, added, kwargs, patch)
        held.discard()
    info["unexpected_keys"] = set(info["unexpected_keys"]) - set(added)
    loading_info = LoadStateDictInfo(
        missing_keys=set(info["missing_keys"]),
        unexpected_keys=info["unexpected_keys"],
        mismatched_keys=set(info["mismatched_keys"]),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    log_state_dict_report(model, str(pretrained_model_name_or_path), True, loading_info, logger=_TRANSFORMERS_LOGGER)
    return (model, info) if want_info else model


def _from_adapter(path: str | os.PathLike, adapter_config_file: str, kwargs: dict[str, Any]) -> nn.Module:
    """:func:`from_pretrained` of a PEFT adapter (``adapter_config_file`` is its resolved ``adapter_config.json``):
    the base loaded and patched, then the adapter loaded onto it."""
    from peft import PeftConfig, PeftModel

    if kwargs.get("output_loading_info"):
        raise TypeError(
            f"from_pretrained: output_loading_info is not supported for the PEFT adapter {path}; PEFT reports missing "
            f"adapter keys itself"
        )
    kwargs = dict(kwargs)
    peft_options = {name: kwargs.pop(name) for name in ("adapter_name", "is_trainable") if name in kwargs}
    adapter_hub = _hub_kwargs(kwargs)
    base_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "subfolder")}
    peft_config = PeftConfig.from_json_file(adapter_config_file)
    base_path = peft_config.get("base_model_name_or_path")
    if not base_path:
        raise ValueError(
            f"{path}: adapter_config.json names no base model (`base_model_name_or_path` is empty); load the base, "
            f"patch it with hf_sparse_attn.patch_model and call peft.PeftModel.from_pretrained(base, {str(path)!r})"
        )
    if peft_config.get("revision"):
        base_kwargs["revision"] = peft_config["revision"]
    base = _from_checkpoint(base_path, _adapter_base_class(path, peft_config), base_kwargs)
    patch_file = cached_file(path, PATCH_FILE, _raise_exceptions_for_missing_entries=False, **adapter_hub)
    if patch_file is not None:
        with open(patch_file) as f:
            options = PatchConfig.from_dict(json.load(f)).to_dict()
        patch_model(base, **{k: v for k, v in options.items() if k != "version"})
    head_parts = [m for m in peft_config.get("modules_to_save") or [] if m.rpartition(".")[2] == "extra"]
    if head_parts and get_patch_config(base) is None:  # PEFT would skip them without a word
        raise ValueError(
            f"{path}: the adapter holds a patched LM head's parameters ({', '.join(head_parts)}), but there is no "
            f"{PATCH_FILE} beside it and its base {base_path!r} is not a patched checkpoint; write the file with "
            f"hf_sparse_attn.save_adapter_patch(peft_model, folder) when saving the adapter"
        )
    return PeftModel.from_pretrained(base, path, **peft_options, **adapter_hub)


def _adapter_base_class(path: str | os.PathLike, peft_config: dict[str, Any]) -> Any:
    """The transformers class to load an adapter's base model with: the auto class of its PEFT ``task_type``, else the
    class PEFT recorded in ``auto_mapping``, else None (the class the base's ``config.json`` records)."""
    task_type = peft_config.get("task_type")
    if task_type is not None:
        if task_type not in _ADAPTER_BASE_CLASSES:
            raise ValueError(
                f"{path}: adapter_config.json has task_type {task_type!r}; supported task types: "
                f"{', '.join(sorted(_ADAPTER_BASE_CLASSES))} (or none)"
            )
        return getattr(transformers, _ADAPTER_BASE_CLASSES[task_type])
    auto_mapping = peft_config.get("auto_mapping") or {}
    class_name = auto_mapping.get("base_model_class")
    if class_name is None:
        return None
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not str(auto_mapping.get("parent_library", "")).startswith("transformers"):
        raise ValueError(
            f"{path}: adapter_config.json's auto_mapping names {class_name!r} from "
            f"{auto_mapping.get('parent_library')!r}, not a transformers model class"
        )
    return model_class


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _raise_if_stored_only(model: nn.Module, caller: str) -> None:
    """``ValueError`` for a model whose config carries a patch that the instance does not run."""
    data = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if data is None:
        return
    name = getattr(model.config, "name_or_path", "") or "its checkpoint"
    raise ValueError(
        f"{caller}: this {type(model).__name__} is not patched, but its config carries an hf_sparse_attn patch "
        f"({data!r}): plain transformers loaded {name} and did not apply it (without "
        f'attn_implementation="{attention.ATTENTION_ALIAS}" it runs softmax). Load it with '
        f"hf_sparse_attn.from_pretrained(path), or call hf_sparse_attn.patch_model(model, ...) to patch it, or "
        f"hf_sparse_attn.unpatch_model(model) to drop the stored patch."
    )


def _patch_of(model: nn.Module, caller: str) -> PatchConfig:
    """The instance's patch, or ``ValueError`` naming ``caller`` and the fix."""
    patch = vars(model).get(_PATCH_ATTR)
    if patch is None:
        _raise_if_stored_only(model, caller)
        raise ValueError(f"{caller}: the model is not patched; call hf_sparse_attn.patch_model(model, ...) first")
    return patch


def _resolve_rates(model: nn.Module, config: PatchConfig, num_layers: int) -> list:
    """One rate per layer in the form the attention function takes; ``ValueError`` for a per-head rate whose length
    is not the number of attention heads."""
    num_heads = model.config.num_attention_heads
    rates = layer_rates(config.sparsity, num_layers)
    for index, rate in enumerate(rates):
        if isinstance(rate, list) and len(rate) != num_heads:
            raise ValueError(
                f"sparsity[{index}]: a per-head rate needs one value per attention head ({num_heads}); got {len(rate)}"
            )
    return [rate_value(rate) for rate in rates]


def _set_rates(modules: list[nn.Module], rates: list, eps: float) -> None:
    for module, rate in zip(modules, rates, strict=True):
        setattr(module, attention.RATE_ATTR, rate)
        setattr(module, attention.EPS_ATTR, eps)


def _record(model: nn.Module, config: PatchConfig) -> None:
    """Make ``config`` the instance's patch and its serialisation in ``model.config``."""
    setattr(model, _PATCH_ATTR, config)
    setattr(model.config, CONFIG_KEY, config.to_dict())
    clear_stored_rates(model)


def _own_config(model: nn.Module) -> None:
    """Give ``model`` its own copy of its config and point every submodule that held the old object at it, so that
    changing it never changes another model built from the same config object."""
    old = model.config
    new = copy.deepcopy(old)
    for module in model.modules():
        if vars(module).get("config") is old:
            module.config = new


def _head_key(config: PatchConfig) -> tuple:
    return config.head_name, tuple(sorted(config.head_options().items()))


def _new_head(model: nn.Module, output_layer: nn.Linear, config: PatchConfig) -> nn.Linear | None:
    """The head ``config`` asks for on ``output_layer``'s weights, or None when the current one is it already (its
    trained parameters are kept)."""
    current = vars(model).get(_HEAD_ATTR)
    if current == _head_key(config) or (current is None and config.head_name == "softmax"):
        return None
    return heads.build_head(config.head_name, heads.restore_linear(output_layer), **config.head_options())


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    if old is new:
        return
    path = next(name for name, module in model.named_modules() if module is old)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, new)


def _resize_token_embeddings(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Embedding:
    """``resize_token_embeddings`` of a patched model (bound on the instance by ``patch_model``): transformers
    replaces the output layer by a plain ``nn.Linear`` of the new size, tied or not; the head is put back on top of
    it, with its own parameters (which do not depend on the vocabulary size)."""
    head = model.get_output_embeddings()
    embeddings = type(model).resize_token_embeddings(model, *args, **kwargs)
    resized = model.get_output_embeddings()
    if resized is not head and isinstance(head, heads._LogProbHead):
        head.use_linear(resized)
        _replace_module(model, resized, head)
    return embeddings


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder", "proxies")
    return {k: kwargs[k] for k in names if k in kwargs}


def _weights_name(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.<variant>.safetensors``, as transformers names variant weights."""
    if not variant:
        return name
    stem, _, suffix = name.partition(".")
    return f"{stem}.{variant}.{suffix}"


def _load_tensors(
    model: nn.Module, path: str | os.PathLike, names: list[str], kwargs: dict[str, Any], patch: PatchConfig
) -> None:
    """Read ``names`` into ``model`` from the weights transformers loads: ``model.safetensors`` when the checkpoint
    has it, else the shards that ``model.safetensors.index.json`` lists (transformers' order in
    ``modeling_utils._get_resolved_checkpoint_files``; a stale index left by an earlier sharded save is ignored)."""
    hub = _hub_kwargs(kwargs)
    variant = kwargs.get("variant")
    single = cached_file(
        path, _weights_name("model.safetensors", variant), _raise_exceptions_for_missing_entries=False, **hub
    )
    if single is not None:
        files = [single]
    else:
        index_file = cached_file(path, _weights_name("model.safetensors.index.json", variant), **hub)
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = [cached_file(path, shard, **hub) for shard in sorted({weight_map[n] for n in names if n in weight_map})]
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            found.update({name: f.get_tensor(name) for name in names if name in f.keys()})  # noqa: SIM118
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks the patched head's parameters {missing}")
    expected = model.state_dict()
    wrong = [
        f"{n}: {tuple(t.shape)} in the checkpoint, {tuple(expected[n].shape)} for the config"
        for n, t in found.items()
        if t.shape != expected[n].shape
    ]
    if wrong:
        options = ", ".join(f"{k}={v!r}" for k, v in patch.head_options().items())
        raise ValueError(
            f"{path}: the {patch.head_name!r} head's saved parameters do not fit the head that config.json's "
            f"hf_sparse_attn entry describes ({options}); was that entry edited? " + "; ".join(wrong)
        )
    model.load_state_dict(found, strict=False)


#: the logger transformers writes its load report to
_TRANSFORMERS_LOGGER = logging.getLogger("transformers.modeling_utils")


class _HeldLoadReport(logging.Filter):
    """Hold back transformers' load report (``... LOAD REPORT from: ...``) while active. If the block fails, the
    held report is emitted as it was on exit; :meth:`discard` drops it (the caller emits a corrected one)."""

    def __enter__(self) -> _HeldLoadReport:
        self.held: list[logging.LogRecord] = []
        _TRANSFORMERS_LOGGER.addFilter(self)
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True

    def discard(self) -> None:
        self.held.clear()

    def __exit__(self, *exc: object) -> None:
        _TRANSFORMERS_LOGGER.removeFilter(self)
        for record in self.held:
            _TRANSFORMERS_LOGGER.handle(record)
