"""The fused LM-head loss inside patched models: training with ``labels`` never materialises the logits.

``patch_model`` calls :func:`enable_fused_loss` on a causal or masked LM (whatever its head, plain softmax
included). From then on, a call of that *instance* (the class is untouched) that

- is in training mode with autograd enabled,
- passes ``labels`` (and, for a causal LM, keeps every position: ``logits_to_keep`` 0 and transformers' own
  ``ForCausalLM`` loss function),
- and whose output layer is a plain ``nn.Linear`` or one of our heads (not, e.g., a PEFT LoRA layer),

runs the model body as usual, hands the hidden states that would enter the output layer to
:func:`hf_sparse_attn.kernels.fused_head_loss` with the same label handling as transformers (GPT-2: labels shifted
by one inside the loss, ``shift_labels`` and ``ignore_index`` honoured, and ``num_items_in_batch`` from Trainer
turns the mean into ``sum / num_items_in_batch``; BERT/RoBERTa MLM: the mean over labels != -100), and returns the
model's usual output with that ``loss`` and **``logits=None``**. Every other call (evaluation, ``generate()``,
pipelines, Trainer's ``prediction_step`` in eval mode, calls without labels) is the model's own forward,
unchanged. The output layer is intercepted generically through ``model.get_output_embeddings()``, so BERT's and
RoBERTa's transform (dense + GELU + LayerNorm) runs as usual before it.

Trainer's training step only reads ``outputs.loss``. Code that needs logits in training mode calls the model
without ``labels`` (and computes its own loss) or calls :func:`disable_fused_loss` first.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from hf_sparse_attn.heads import MixtureHead, MonotonicHead, SigSoftmaxHead, _LogProbHead

__all__ = ["disable_fused_loss", "enable_fused_loss", "fused_loss_enabled", "head_nll"]

#: instance attribute marking a model whose forward we wrapped
_MARK = "_hf_sparse_attn_fused_loss"
_CAUSAL_CLASSES = frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
_MASKED_CLASSES = frozenset(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values())


def head_nll(
    head: nn.Linear,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""``F.cross_entropy(head(hidden), labels, ...)`` for a plain ``nn.Linear`` or any of our heads, computed by
    the fused, chunked loss (no `[N x V]` tensor; see :mod:`hf_sparse_attn.ops.head_loss`).

    Args:
        head (`nn.Linear`): ``model.get_output_embeddings()``: ``nn.Linear`` (softmax) or a head from
            :func:`hf_sparse_attn.heads.build_head`.
        hidden (`torch.Tensor`): `[..., D]` the output layer's input.
        labels (`torch.Tensor`): `[...]` targets, ``ignore_index`` where no loss is wanted.
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy`` (reduction ``"mean"`` or ``"sum"``).

    Returns:
        `torch.Tensor`: the scalar loss (float32).

    Examples::

        >>> head = build_head("plif", nn.Linear(8, 11), num_knots=10)
        >>> hidden, labels = torch.randn(4, 8), torch.tensor([1, 2, -100, 3])
        >>> bool(torch.allclose(head_nll(head, hidden, labels), F.cross_entropy(head(hidden), labels)))
        True
    """
    from hf_sparse_attn.kernels import fused_head_loss

    options: dict[str, Any] = {}
    if type(head) is nn.Linear:
        name = "softmax"
    elif isinstance(head, SigSoftmaxHead):
        name = "sigsoftmax"
    elif isinstance(head, MonotonicHead):
        name = "plif"
        options = {"theta": head.extra.theta, "knot_range": head.extra.knot_range}
    elif isinstance(head, MixtureHead):
        name = head.head_name
        options = {"mixture": head.extra, "mixture_params": list(head.extra.parameters())}
    else:
        raise TypeError(f"head must be an nn.Linear or a hf_sparse_attn head; got {type(head).__name__}")
    return fused_head_loss(
        hidden,
        head.weight,
        labels,
        head.bias,
        head=name,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
        **options,
    )


def enable_fused_loss(model: nn.Module) -> nn.Module:
    """Route ``model``'s training loss through the fused head loss (module docstring). Only causal LMs and masked
    LMs get it; other models are returned unchanged. Idempotent; changes the instance only."""
    name = type(model).__name__
    if name not in _CAUSAL_CLASSES and name not in _MASKED_CLASSES:
        return model
    if not getattr(model, _MARK, False):
        model.forward = types.MethodType(_instance_forward(type(model)), model)
        setattr(model, _MARK, True)
    return model


@functools.cache
def _instance_forward(model_class: type) -> Callable[..., Any]:
    """:func:`_fused_forward` under the class forward's signature, name and docstring (Trainer reads the signature
    to keep the input columns). A plain function, not a ``functools.partial``: ``torch.compile`` needs its source
    file to trace the model."""

    @functools.wraps(model_class.forward)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _fused_forward(self, *args, **kwargs)

    return forward


def disable_fused_loss(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_fused_loss`: the class's own forward again. Returns ``model``."""
    if getattr(model, _MARK, False):
        del model.forward
        delattr(model, _MARK)
    return model


def fused_loss_enabled(model: nn.Module) -> bool:
    """Whether training calls of ``model`` with labels use the fused head loss."""
    return bool(getattr(model, _MARK, False))


def _fused_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The instance's forward: the class's forward, with the loss fused when the call allows it."""
    forward = type(self).forward.__get__(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    call = _named_arguments(type(self).forward, self, args, kwargs)
    head = self.get_output_embeddings()
    loss_args = _loss_arguments(self, call, head)
    if loss_args is None:
        return forward(*args, **kwargs)
    labels, ignore_index, num_items = loss_args
    return_dict = call.pop("return_dict", None)
    captured: list[torch.Tensor] = []

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        captured.append(hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)  # stands in for the logits, which nobody reads

    head.forward = capture
    try:
        out = forward(**call, labels=None, return_dict=True)
    finally:
        del head.forward
    reduction = "mean" if num_items is None else "sum"
    loss = head_nll(head, captured[0], labels.to(captured[0].device), ignore_index=ignore_index, reduction=reduction)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    out = type(out)(**{key: value for key, value in out.items() if key != "logits"}, loss=loss)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()


def _named_arguments(function: Any, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (positional ones bound to their names, ``**kwargs`` merged)."""
    bound = inspect.signature(function).bind(model, *args, **kwargs)
    call = dict(bound.arguments)
    call.pop(next(iter(call)))  # self
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(parameter.name, {}))
    return call


def _loss_arguments(model: nn.Module, call: dict[str, Any], head: nn.Module) -> tuple[torch.Tensor, int, Any] | None:
    """(per-position labels, ignore_index, num_items_in_batch or None) when this call's loss can be fused, else
    None. Pops ``labels`` (and the causal loss's own arguments) from ``call``."""
    if call.get("labels") is None or not (type(head) is nn.Linear or isinstance(head, _LogProbHead)):
        return None
    if type(model).__name__ in _MASKED_CLASSES:
        return call.pop("labels"), -100, None  # BERT/RoBERTa MLM: CrossEntropyLoss(), the mean over labels != -100
    keep = call.get("logits_to_keep", 0)
    if (isinstance(keep, torch.Tensor) or keep != 0) or model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        return None
    labels = call.pop("labels")
    ignore_index = call.pop("ignore_index", -100)
    shift_labels = call.pop("shift_labels", None)
    if shift_labels is None:  # ForCausalLMLoss: position t predicts label t + 1; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels, ignore_index, call.get("num_items_in_batch")
