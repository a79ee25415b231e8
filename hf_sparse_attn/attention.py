"""The r-softmax attention function, registered with transformers' ``AttentionInterface``.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` from
every attention module whose ``config._attn_implementation`` is :data:`ATTENTION_NAME`. The function is
stateless: it reads the layer's rate from ``module.hf_sparse_attn_rate`` (set by ``patch_model``), so layers
can differ although all of them share one implementation name.

Masks (verified on transformers 5.23, see ``docs/transformers-notes.md``): a name registered only with
``AttentionInterface`` receives ``attention_mask=None`` -- no padding and no causal mask -- because
``masking_utils`` skips mask creation for implementations without a mask builder. We register transformers' own
``sdpa_mask``, with its default skips, as our builder, so every layer receives exactly the mask the SDPA
implementation receives: ``None`` (causality then comes from ``is_causal``), a boolean ``[B, 1, T, S]`` mask, or a
4-D mask the user passed, which transformers forwards unchanged (boolean or additive float). Layers whose rate is
None (softmax) hand that mask to transformers' ``sdpa_attention_forward`` and compute exactly what the unpatched
SDPA model computes. Layers with a rate read it as follows (:func:`mask_parts`):

- ``None``: every key is valid; with ``is_causal`` (the keyword argument, else ``module.is_causal``, as SDPA reads
  it) and more than one query, query ``i`` sees keys ``j <= i``: SDPA's top-left alignment. transformers skips the
  mask only where that is also the right alignment (``T == S``, one query, or a static-cache prefill whose keys
  past ``T`` are empty slots), and materialises it otherwise.
- boolean: True = the query may attend the key.
- additive float (the eager format, or a user's 4-D mask such as a document mask or a bias): *added* to the scores,
  as eager attention does. Values at or below ``torch.finfo(mask.dtype).min / 2`` (:func:`additive_mask_cutoff`; this
  covers ``finfo.min``, which transformers' eager builder writes, and ``-inf``) mark masked keys: they get weight 0
  and do not count towards the rate. Larger values, e.g. ``-1e4`` or ``-1e9``, are biases: they shift the scores
  and the key still counts towards the rate (its weight is 0 unless the bias is small, as under softmax).

The r-softmax layers never read the values of a mask transformers built (:func:`mask_structure`): our builder
(:func:`sparse_attention_mask`) records on each mask it makes from the plain causal or bidirectional pattern and the
2-D ``attention_mask`` what that mask is, key padding ``[B, S]`` plus an optional causal offset, and ``None`` +
``is_causal`` is causality alone. The dispatcher then runs the kernel on CUDA without a host sync or a ``[B, T, S]``
temporary; any other mask (a user's 4-D mask, packed sequences, extra mask functions) takes the reference path.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from hf_sparse_attn import architectures, rates
from hf_sparse_attn.kernels import r_softmax_attention

ATTENTION_NAME = "hf_sparse_attn"
#: a shorter name registered for the same function and mask builder
ATTENTION_ALIAS = "r_softmax"
#: attribute on each self-attention module holding its rate: None (softmax), a float, or a tensor [H]
RATE_ATTR = "hf_sparse_attn_rate"
#: attribute holding the r-softmax margin epsilon
EPS_ATTR = "hf_sparse_attn_eps"
#: attribute counting the active :func:`returning_weights` blocks (forces the reference path on CUDA)
WEIGHTS_ATTR = "hf_sparse_attn_need_weights"
#: attribute :func:`sparse_attention_mask` puts on the masks it builds: ``(key_padding [B, S] or None, causal offset
#: or None)``, see :func:`mask_structure`
LAYOUT_ATTR = "hf_sparse_attn_layout"
#: a (key padding, causal offset) pair as the dispatcher takes it
MaskStructure = tuple[torch.Tensor | None, int | None]
_SDPA_MASK_SIGNATURE = inspect.signature(sdpa_mask)

try:  # transformers collects ``output_attentions`` with forward hooks and does not always tell the function
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - a transformers without output capturing passes ``output_attentions``
    _active_collector = None


def additive_mask_cutoff(dtype: torch.dtype) -> float:
    """Additive mask values at or below this (``finfo(dtype).min / 2``) mark masked keys, not biases.

    Adding any reasonable score to such a value leaves it below the cutoff in eager attention's own arithmetic, so
    eager softmax gives the key no weight whatever its score (unless every key of the row is masked);
    ``finfo.min`` (transformers' eager builder) and ``-inf`` fall here, finite conventions such as ``-1e4`` or
    ``-1e9`` do not."""
    return torch.finfo(dtype).min / 2


def mask_parts(
    attention_mask: torch.Tensor | None,
    module: nn.Module,
    query_length: int,
    key_length: int,
    device: torch.device,
    is_causal: bool | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a mask in any format transformers hands over into ``(valid, bias)``.

    Args:
        attention_mask: None, bool broadcastable to ``[B, H, T, S]`` (True = attend) or additive float.
        module: the attention module (``module.is_causal`` is read when ``attention_mask`` is None).
        query_length, key_length: ``T`` and ``S``.
        is_causal: the ``is_causal`` keyword a model may pass; it overrides ``module.is_causal`` (as in SDPA).

    Returns:
        ``valid``: bool broadcastable to ``[B, H, T, S]`` (True = the key counts), or None when all keys are valid;
        ``bias``: the additive float mask to add to the scores (masked entries included; they are excluded by
        ``valid`` anyway), or None.

    Raises:
        TypeError: for a mask that is neither bool nor floating point (e.g. an integer 0/1 mask, which would be
            ambiguous between "1 = attend" and "add 1").
    """
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal or query_length == 1:
            return None, None
        # SDPA's is_causal is aligned top-left: query i sees keys j <= i (see the module docstring)
        rows = torch.arange(query_length, device=device)[:, None]
        cols = torch.arange(key_length, device=device)[None, :]
        return cols <= rows, None  # (T, S)
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    if not attention_mask.is_floating_point():
        raise TypeError(
            "attention_mask must be a bool mask (True = attend) or an additive float mask (0 = attend, "
            f"torch.finfo(dtype).min or -inf = masked); got dtype {attention_mask.dtype}"
        )
    # `~(x <= cutoff)`, not `x > cutoff`: a NaN in the mask keeps its key valid, so the row comes out NaN as in eager
    return ~(attention_mask <= additive_mask_cutoff(attention_mask.dtype)), attention_mask


def sparse_attention_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' ``sdpa_mask`` (same arguments, same result), recording what the mask is where that is known.

    When transformers builds the mask from its plain causal or bidirectional pattern and the 2-D ``attention_mask``
    (``create_causal_mask`` / ``create_bidirectional_mask`` without extra mask functions or packed sequences), the
    returned mask carries ``(key_padding [B, S] or None, causal_offset or None)`` under :data:`LAYOUT_ATTR`, with
    ``mask[b, 0, i, j] = key_padding[b, j] and j <= i + causal_offset``. Building it reads no tensor values: the
    padding is the 2-D mask transformers passed in (a view of it), the offset is ``q_offset - kv_offset``."""
    mask = sdpa_mask(*args, **kwargs)
    if mask is not None:
        layout = _layout(_SDPA_MASK_SIGNATURE.bind(*args, **kwargs).arguments)
        if layout is not None:
            setattr(mask, LAYOUT_ATTR, layout)
    return mask


def _layout(arguments: dict[str, Any]) -> MaskStructure | None:
    """The structure of the mask ``sdpa_mask(**arguments)`` builds, or None when it is not padding + causality."""
    pattern = arguments.get("mask_function", causal_mask_function)
    q_length, kv_length = arguments["q_length"], arguments["kv_length"]
    q_offset, kv_offset = arguments.get("q_offset", 0), arguments.get("kv_offset", 0)
    if pattern not in (causal_mask_function, bidirectional_mask_function) or isinstance(kv_offset, torch.Tensor):
        return None
    key_padding = prepare_padding_mask(arguments.get("attention_mask"), kv_length, kv_offset)
    if key_padding is not None:
        if key_padding.dim() != 2 or key_padding.dtype != torch.bool:
            return None
        key_padding = key_padding[:, kv_offset : kv_offset + kv_length]  # (B, S): the keys sdpa_mask indexes
    if pattern is bidirectional_mask_function:
        return key_padding, None
    if not isinstance(q_offset, torch.Tensor):
        return key_padding, q_offset - kv_offset
    if q_length != 1:  # a static cache's tensor offset with several queries: using it would need a sync
        return None
    # one query at a tensor position: causality is a key padding (keys up to the query's position), no sync
    seen = torch.arange(kv_length, device=q_offset.device) + kv_offset <= q_offset  # (S,)
    return (seen[None, :] if key_padding is None else key_padding & seen), None


def mask_structure(
    attention_mask: torch.Tensor | None,
    module: nn.Module,
    batch: int,
    query_length: int,
    key_length: int,
    is_causal: bool | None = None,
) -> MaskStructure | None:
    """``(key_padding [B, S] or None, causal_offset or None)`` describing ``attention_mask`` without reading its
    values, or None when the mask is not known to be key padding plus causality (then use :func:`mask_parts`).

    ``None`` with causality (``is_causal``, else ``module.is_causal``) and more than one query is offset 0 (SDPA's
    top-left alignment, as in :func:`mask_parts`); a mask from :func:`sparse_attention_mask` gives the structure it
    recorded, when its shapes match this call."""
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return None, (0 if causal and query_length > 1 else None)
    layout = getattr(attention_mask, LAYOUT_ATTR, None)
    if layout is None or tuple(attention_mask.shape[-2:]) != (query_length, key_length):
        return None
    key_padding = layout[0]
    if key_padding is not None and (key_padding.shape[0] not in (1, batch) or key_padding.shape[1] != key_length):
        return None
    return layout


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Softmax in fp32 over valid keys; masked keys and fully masked rows give exactly 0. A NaN score at a valid
    key makes its row NaN, as in softmax."""
    if valid is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1, dtype=torch.float32)
    return probs.masked_fill(~valid, 0.0)  # fully masked rows: NaN from exp(-inf)/0 -> 0


def _weights_requested(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether the caller needs this layer's probabilities: inside :func:`returning_weights`, or when
    transformers collects attentions (BERT passes ``output_attentions``, GPT-2 only records the module output)."""
    if getattr(module, WEIGHTS_ATTR, 0) or kwargs.get("output_attentions"):
        return True
    collecting = _active_collector.get() if _active_collector is not None else None
    return bool(collecting) and any("attentions" in key for key in collecting)


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with r-softmax, or transformers' SDPA attention where the layer's rate is None.

    A layer with rate None calls ``transformers.integrations.sdpa_attention.sdpa_attention_forward`` with the
    arguments it received, so it computes bit for bit what the unpatched SDPA model computes. A layer with a rate
    computes ``r_softmax(scaling q kᵀ + bias, rate, mask=valid) v`` with ``(valid, bias) =``
    :func:`mask_parts` ``(attention_mask)``: the quantile runs over valid keys only, a query row with no valid key
    gives zeros, and a NaN score at a valid key makes its row NaN (as softmax does). Where :func:`mask_structure`
    knows the mask to be key padding plus causality, the dispatcher gets that structure instead of the mask (same
    result; on CUDA the kernel, with no host sync).

    Args:
        module: the attention module; its rate is ``module.hf_sparse_attn_rate`` (None or absent = softmax).
        query: ``[B, H, T, D]``; key, value: ``[B, H, S, D]`` (S > T under a KV cache).
        attention_mask: None, bool ``[B, 1, T, S]`` (True = attend) or additive float (see the module docstring).
        scaling: multiplier of ``q·k``; defaults to ``D ** -0.5``.
        dropout: attention dropout probability (transformers passes 0 outside training).
        kwargs: passed on to SDPA for softmax layers; ``is_causal`` is honoured by both paths.

    Returns:
        ``(output [B, T, H, D], probabilities [B, H, T, S] or None)``. The probabilities are returned before
        dropout, so ``output_attentions=True`` shows the r-softmax sparsity pattern itself. They are computed
        whenever transformers collects attentions or :func:`returning_weights` is active; otherwise softmax
        layers (SDPA) and the Triton kernel path return None.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    need_weights = _weights_requested(module, kwargs)
    rate, eps = rates.module_rate(module)  # patch_model's rate, else the stored patch's (cached on the module)
    if rate is None:
        # SDPA warns that it cannot return weights when it sees output_attentions; we return them ourselves below
        sdpa_kwargs = {name: value for name, value in kwargs.items() if name != "output_attentions"}
        output, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **sdpa_kwargs
        )
        if not need_weights:
            return output, None
    t_len, s_len = query.shape[-2], key.shape[-2]
    is_causal = kwargs.get("is_causal")
    structure = (
        None if rate is None else mask_structure(attention_mask, module, query.shape[0], t_len, s_len, is_causal)
    )
    if structure is not None:  # padding + causality, known without reading the mask
        (key_padding, causal_offset), valid, bias = structure, None, None
    else:
        key_padding = causal_offset = None
        valid, bias = mask_parts(attention_mask, module, t_len, s_len, query.device, is_causal)
    if rate is not None:
        return r_softmax_attention(
            query, key, value, valid, rate, scaling=scaling, eps=eps, dropout=dropout, training=module.training,
            need_weights=need_weights, bias=bias, key_padding=key_padding, causal_offset=causal_offset,
        )  # fmt: skip
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # (B, H, T, S)
    probs = masked_softmax(scores if bias is None else scores + bias, valid)
    return output, probs.to(value.dtype)


@contextmanager
def returning_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every self-attention layer of ``model`` returns its probabilities, also to callers that
    read them without ``output_attentions`` (e.g. a forward hook); on CUDA this takes the reference path.
    ``output_attentions=True`` alone already returns them. Covers models patched by ``patch_model`` and models
    loaded with the registered implementation name alone (the layers come from the architecture table, a PEFT
    wrapper is looked through). Blocks nest."""
    get_base_model = getattr(model, "get_base_model", None)  # a PEFT model: its transformers model
    modules = architectures.self_attention_modules(get_base_model() if callable(get_base_model) else model)
    for module in modules:  # a depth counter, so that nested blocks (e.g. measure_sparsity inside one) compose
        setattr(module, WEIGHTS_ATTR, getattr(module, WEIGHTS_ATTR, 0) + 1)
    try:
        yield
    finally:
        for module in modules:
            depth = getattr(module, WEIGHTS_ATTR, 1) - 1
            if depth > 0:
                setattr(module, WEIGHTS_ATTR, depth)
            elif hasattr(module, WEIGHTS_ATTR):
                delattr(module, WEIGHTS_ATTR)


def register() -> None:
    """Register the attention function and its mask builder under :data:`ATTENTION_NAME` (idempotent).

    The mask builder is :func:`sparse_attention_mask`: transformers' ``sdpa_mask``, so softmax layers get exactly
    SDPA's masks, plus the recorded structure that lets r-softmax layers skip reading them."""
    for name in (ATTENTION_NAME, ATTENTION_ALIAS):
        AttentionInterface.register(name, sparse_attention_forward)
        AttentionMaskInterface.register(name, sparse_attention_mask)


register()
