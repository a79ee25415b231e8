"""Trainer callbacks: a warm-up schedule for the r-softmax rate, and per-layer sparsity logging.

Both work with a plain :class:`transformers.Trainer` under any ``accelerate launch`` (one process, DDP, FSDP):
they keep no state between steps, read the step from ``state.global_step`` and change only the rate attributes
that :func:`hf_sparse_attn.patch_model` put on the attention modules.

Examples::

    >>> model = patch_model(AutoModelForSequenceClassification.from_pretrained("roberta-base"), sparsity=0.5)
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
    ...                   callbacks=[SparsityScheduleCallback(0.5, warmup_steps=500)])
    >>> add_first(trainer, SparsityLoggingCallback(probe_batch))  # before report_to backends see the logs
    >>> trainer.train()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.config import Sparsity, layer_rates, normalize_sparsity
from hf_sparse_attn.patch import save_adapter_patch, set_sparsity
from hf_sparse_attn.sparsity import measure_sparsity

#: prefix of the logged per-layer sparsity keys: ``sparsity/layer_0``, ..., ``sparsity/mean``
LOG_PREFIX = "sparsity/"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DeepSpeed / ``torch.compile`` wrappers and a PEFT ``PeftModel``."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def scheduled_sparsity(target: Sparsity, num_layers: int, step: int, warmup_steps: int) -> list:
    r"""The per-layer rates of a linear warm-up at optimizer step ``step``.

    Each layer's rate is ``r(step) = min(1, step / warmup_steps) * r_target`` (per head for per-head targets);
    layers whose target is ``None`` keep softmax throughout (r = 0 is not softmax, see DESIGN §2).
    ``warmup_steps = 0`` gives the target at once.

    Args:
        target: the rate reached at the end of the warm-up, in any form ``patch_model`` accepts.
        num_layers: number of self-attention layers of the model.
        step: completed optimizer steps (``state.global_step``).
        warmup_steps: length of the warm-up, >= 0.

    Returns:
        One entry per layer: ``None``, a float, or a per-head list of floats.

    Examples::

        >>> scheduled_sparsity([None, 0.5], 2, step=100, warmup_steps=400)
        [None, 0.125]
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0; got {warmup_steps}")
    factor = 1.0 if step >= warmup_steps else step / warmup_steps

    def scale(rate: Any) -> Any:
        if rate is None:
            return None
        if isinstance(rate, list):
            return [factor * r for r in rate]
        return factor * rate

    return [scale(rate) for rate in layer_rates(target, num_layers)]


class SparsityScheduleCallback(TrainerCallback):
    r"""Linear warm-up of the r-softmax rate from 0 to ``target`` over ``warmup_steps`` optimizer steps.

    Before every optimizer step the rates are set to :func:`scheduled_sparsity` at ``state.global_step`` with
    :func:`hf_sparse_attn.set_sparsity`. The rate is a function of the step alone, so a run resumed with
    ``trainer.train(resume_from_checkpoint=...)`` uses exactly the rates of an uninterrupted run, and every
    process of a distributed run sets the same rates. Warming up from r = 0 adapts a pretrained softmax model
    gradually; layers whose target is ``None`` stay softmax.

    Args:
        target: the final rate: a float in [0, 1], a per-layer list (``None`` entries keep softmax; per-head lists
            allowed) or ``{layer_index: rate}``. The model must be patched (``patch_model``) before training.
        warmup_steps: number of optimizer steps to reach ``target`` (>= 0).

    Examples::

        >>> patch_model(model, sparsity=0.5)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train,
        ...                   callbacks=[SparsityScheduleCallback(0.5, warmup_steps=500)])
    """

    def __init__(self, target: Sparsity, warmup_steps: int) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0; got {warmup_steps!r}")
        self.target = normalize_sparsity(target)
        self.warmup_steps = warmup_steps

    def _apply(self, model: nn.Module, step: int) -> None:
        model = unwrap_model(model)
        if step >= self.warmup_steps:  # the target as given, so config.json records it in the user's form
            set_sparsity(model, self.target)
        else:
            set_sparsity(
                model, scheduled_sparsity(self.target, len(self_attention_modules(model)), step, self.warmup_steps)
            )

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self._apply(model, state.global_step)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        if state.global_step <= self.warmup_steps:  # afterwards the rate stays at the target set here
            self._apply(model, state.global_step)


class SparsityLoggingCallback(TrainerCallback):
    """Log the measured fraction of exact zeros per layer (``sparsity/layer_<i>`` and ``sparsity/mean``) with every
    training log.

    At each training log (every ``logging_steps``), the model runs once without gradient in eval mode on a fixed
    probe batch and :func:`hf_sparse_attn.measure_sparsity` counts the zeros among valid keys. The values are added to
    the ``logs`` dict, so every ``report_to`` backend that runs after this callback sees them, and to the entry of
    ``state.log_history`` (saved in ``trainer_state.json``, read by ``hf-sparse-attn plot``). Callbacks run in list
    order and transformers puts the reporting ones first, so install this one with :func:`add_first`.
    The cost is one forward pass of the probe batch per log; keep it small (a few examples).

    Args:
        probe_batch: model inputs ``{"input_ids": [B, T], "attention_mask": [B, T], ...}``, e.g. a few collated
            evaluation examples; labels are ignored.

    Examples::

        >>> probe = data_collator([eval_dataset[i] for i in range(4)])
        >>> add_first(trainer, SparsityLoggingCallback(probe))
    """

    def __init__(self, probe_batch: Mapping[str, torch.Tensor]) -> None:
        if "input_ids" not in probe_batch:
            raise ValueError(
                f"probe_batch must hold model inputs including 'input_ids'; got keys {sorted(probe_batch)}"
            )
        self.probe_batch = {k: v for k, v in probe_batch.items() if isinstance(v, torch.Tensor)}

    def measure(self, model: nn.Module) -> dict[str, float]:
        """``{"sparsity/layer_<i>": zero fraction, ..., "sparsity/mean": average over layers}`` on the probe batch."""
        model = unwrap_model(model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in self.probe_batch.items()}
        was_training = model.training
        model.eval()
        try:
            per_layer = measure_sparsity(model, batch)
        finally:
            model.train(was_training)
        metrics = {f"{LOG_PREFIX}layer_{i}": value for i, value in enumerate(per_layer)}
        metrics[f"{LOG_PREFIX}mean"] = sum(per_layer) / len(per_layer)
        return metrics

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model=None,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries carry no train loss
            return
        metrics = self.measure(model)
        logs.update(metrics)
        # Trainer.log appends a copy of `logs` to the history before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


class AdapterPatchCallback(TrainerCallback):
    """Write the patch beside the PEFT adapter in every ``checkpoint-N`` folder the Trainer saves.

    PEFT saves the adapter without the base's ``config.json``, which is where a full checkpoint carries its patch;
    without the patch file :func:`hf_sparse_attn.from_pretrained` of a checkpoint would rebuild a *softmax* base
    for a sparsity-only adapter. With this callback every checkpoint reloads as the patched PEFT model
    (:func:`hf_sparse_attn.patch.save_adapter_patch` does the writing; the final ``output_dir`` needs one call of it
    after ``trainer.save_model()``). A model that is not a PEFT model is left alone.

    Examples::

        >>> trainer = Trainer(model=peft_model, args=args, callbacks=[AdapterPatchCallback()])
        >>> trainer.train()  # output_dir/checkpoint-500/ holds adapter + hf_sparse_attn_patch.json
        >>> hf_sparse_attn.from_pretrained("output_dir/checkpoint-500")  # PeftModel on the patched base
    """

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        model = extract_model_from_parallel(model) if model is not None else None
        if model is None or not hasattr(model, "get_base_model") or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_adapter_patch(model, folder)


def add_first(trainer: Trainer, callback: TrainerCallback) -> None:
    """Install ``callback`` ahead of all others, so that what it adds to ``logs`` in ``on_log`` reaches the reporting
    callbacks (TensorBoard, W&B, the progress printer, ...), which transformers installs first.

    Examples::

        >>> add_first(trainer, SparsityLoggingCallback(probe))
    """
    trainer.callback_handler.callbacks.insert(0, callback)
