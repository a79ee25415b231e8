"""`PatchConfig`: what `patch_model` did to a model, validated, and (de)serialised into ``model.config``.

The whole patch is one JSON-serialisable dict stored under ``model.config.hf_sparse_attn`` (key
:data:`CONFIG_KEY`), so ``save_pretrained`` / ``push_to_hub`` carry it in ``config.json`` and
:func:`hf_sparse_attn.from_pretrained` rebuilds the patched model from it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

import torch

CONFIG_KEY = "hf_sparse_attn"

#: Heads accepted by ``head=``; ``None`` and ``"softmax"`` both keep the model's own output layer.
HEAD_NAMES = ("softmax", "sigsoftmax", "mos", "moss", "plif")

_FLOAT32 = torch.finfo(torch.float32)
#: ``eps`` range. The margin ``t = m - q_r + eps`` is the row maximum's weight when the maximum is the quantile
#: (r = 1, ties), so eps must be a normal float32 (>= finfo.tiny), or that weight underflows to 0 and the row
#: to 0/0. Valid keys within eps below the quantile survive, so eps must stay below the spacing of the scores it
#: separates: 2**-10 is the float16 spacing at 1.0 (bfloat16's is 2**-7), so for half-precision scores of
#: magnitude >= 1 the band ``(q_r - eps, q_r]`` holds only ties of the quantile. eps = 1 keeps every key of a
#: typical attention row (measured sparsity 0).
EPS_BOUNDS = (_FLOAT32.tiny, 2.0**-10)
_EPS_WHY = "a normal float32 that is smaller than the half-precision spacing of scores near 1"
#: ``knot_range`` range. The PLIF knots ``-T + 2 T i / (K - 1)`` and the shifted logits ``z + T`` are float32:
#: T up to finfo(float32).max / 4 keeps ``2 T`` and ``z + T`` (|z| <= T) finite; larger T gives inf - inf = NaN.
KNOT_RANGE_BOUNDS = (_FLOAT32.tiny, _FLOAT32.max / 4)
_KNOT_RANGE_WHY = "the float32 knot grid [-knot_range, knot_range] and logits + knot_range must stay finite"

#: One layer's rate: ``None`` keeps softmax, a float in [0, 1], or one float per attention head.
LayerRate = None | float | list[float]
#: What ``sparsity=`` accepts: one rate for every layer, one per layer, or ``{layer_index: rate}``.
Sparsity = None | float | torch.Tensor | Sequence[Any] | Mapping[int, Any]

_SPARSITY_HELP = (
    "a float in [0, 1], None (keep softmax), a per-layer list of those (an entry may also be a per-head list or "
    "a 1-D tensor of shape [num_heads]), or a dict {layer_index: rate}"
)


def _check_rate(value: Any, where: str) -> LayerRate:
    """Validate one layer's rate and return its JSON-friendly form."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(
                f"{where}: the rate tensor requires grad, but rates are fixed numbers (learnable rates are not "
                "supported); pass rate.detach() if a fixed rate is meant"
            )
        if value.dim() == 0:
            value = value.item()
        elif value.dim() == 1:
            value = value.tolist()
        else:
            raise ValueError(
                f"{where}: a per-head rate must be a 1-D tensor [num_heads], got shape {tuple(value.shape)}"
            )
    if isinstance(value, bool) or not isinstance(value, (Real, list, tuple)):
        raise TypeError(f"{where} must be {_SPARSITY_HELP}; got {type(value).__name__} {value!r}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: a per-head rate list must not be empty")
        return [_check_scalar(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return _check_scalar(value, where)


def _check_scalar(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{where} must be a float in [0, 1]; got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a float in [0, 1] (the fraction of valid keys set to zero); got {value}")
    return value


def normalize_sparsity(sparsity: Sparsity) -> Sparsity:
    """Validate ``sparsity`` and return a JSON-serialisable equivalent (floats, lists, ``{int: rate}``)."""
    if sparsity is None or isinstance(sparsity, (Real, torch.Tensor)) and not isinstance(sparsity, bool):
        if isinstance(sparsity, torch.Tensor) and sparsity.dim() > 0:
            raise TypeError(
                "sparsity: a tensor is accepted per layer (shape [num_heads]) inside a list or dict, "
                f"not at the top level; got shape {tuple(sparsity.shape)}. Pass a per-layer list instead."
            )
        return _check_rate(sparsity, "sparsity")
    if isinstance(sparsity, Mapping):
        out: dict[int, LayerRate] = {}
        for key, value in sparsity.items():
            try:
                index = int(key)  # JSON turns int keys into strings; accept them back
            except (TypeError, ValueError):
                raise TypeError(f"sparsity: dict keys must be layer indices (int); got {key!r}") from None
            if index in out:
                raise ValueError(
                    f"sparsity: dict keys both name layer {index} (one is {key!r}); give each layer one key"
                )
            out[index] = _check_rate(value, f"sparsity[{index}]")
        return out
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, (str, bytes, bytearray)):
        return [_check_rate(value, f"sparsity[{i}]") for i, value in enumerate(sparsity)]
    raise TypeError(f"sparsity must be {_SPARSITY_HELP}; got {type(sparsity).__name__} {sparsity!r}")


def layer_rates(sparsity: Sparsity, num_layers: int) -> list[LayerRate]:
    """Resolve a validated ``sparsity`` into one rate per layer.

    Raises ``ValueError`` for a per-layer list of the wrong length or a layer index that does not exist.
    """
    sparsity = normalize_sparsity(sparsity)
    if sparsity is None or isinstance(sparsity, float):
        return [sparsity] * num_layers
    if isinstance(sparsity, dict):
        bad = sorted(i for i in sparsity if not -num_layers <= i < num_layers)
        if bad:
            raise ValueError(
                f"sparsity: layer index {bad[0]} does not exist; the model has {num_layers} layers "
                f"(valid indices 0..{num_layers - 1}, or negative from the end)"
            )
        rates: list[LayerRate] = [None] * num_layers
        named_by: dict[int, int] = {}
        for index, rate in sparsity.items():
            layer = index % num_layers
            if layer in named_by:
                raise ValueError(
                    f"sparsity: dict keys {named_by[layer]} and {index} both name layer {layer} of the "
                    f"{num_layers}-layer model; give each layer one key"
                )
            named_by[layer] = index
            rates[layer] = rate
        return rates
    if len(sparsity) != num_layers:
        raise ValueError(
            f"sparsity: a per-layer list needs one entry per layer; the model has {num_layers} layers, "
            f"got {len(sparsity)} entries"
        )
    return list(sparsity)


@dataclass
class PatchConfig:
    """What :func:`hf_sparse_attn.patch_model` applies to a model.

    Args:
        sparsity: r-softmax rate r, the fraction of *valid* keys (not padded, not in the future) whose attention
            weight is exactly 0 in each query row. A float for every layer, ``None`` to keep softmax, a per-layer
            list (``None`` entries keep softmax in that layer; an entry may be a per-head list), or
            ``{layer_index: rate}`` (unlisted layers keep softmax). Default ``None``.
        head: LM-head output: ``None``/``"softmax"`` (unchanged), ``"sigsoftmax"``, ``"mos"``, ``"moss"``, ``"plif"``.
        num_mixtures: components K of the ``"mos"``/``"moss"`` heads (>= 1). Default 2.
        num_knots: knots of the ``"plif"`` piecewise-linear transform (>= 2). Default 1000.
        knot_range: the ``"plif"`` knots cover ``[-knot_range, knot_range]`` (in
            :data:`KNOT_RANGE_BOUNDS`). Default 20.0.
        eps: added to the r-softmax margin so that the row maximum always survives (in
            :data:`EPS_BOUNDS`). Default 1e-8.
        version: the ``hf_sparse_attn`` version that wrote the config (stamped automatically).
    """

    sparsity: Sparsity = field(default=None, metadata={"help": _SPARSITY_HELP})
    head: str | None = field(default=None, metadata={"help": f"LM head: None or one of {HEAD_NAMES}"})
    num_mixtures: int = field(default=2, metadata={"help": "mixture components K for 'mos'/'moss' (>= 1)"})
    num_knots: int = field(default=1000, metadata={"help": "knots of the 'plif' transform (>= 2)"})
    knot_range: float = field(
        default=20.0, metadata={"help": "'plif' knots span [-knot_range, knot_range] (> 0, finite in float32)"}
    )
    eps: float = field(default=1e-8, metadata={"help": "r-softmax margin epsilon (normal float32, <= 2**-10)"})
    version: str = field(default="", metadata={"help": "hf_sparse_attn version that wrote this config"})

    def __post_init__(self) -> None:
        self.sparsity = normalize_sparsity(self.sparsity)
        if self.head is not None and self.head not in HEAD_NAMES:
            raise ValueError(f"head must be None or one of {', '.join(map(repr, HEAD_NAMES))}; got {self.head!r}")
        self.num_mixtures, self.num_knots, self.knot_range = check_head_options(
            self.num_mixtures, self.num_knots, self.knot_range
        )
        self.eps = _check_bounded(self.eps, "eps", EPS_BOUNDS, _EPS_WHY)
        if not self.version:
            from hf_sparse_attn import __version__

            self.version = __version__

    @property
    def head_name(self) -> str:
        """The head with ``None`` spelled ``"softmax"``."""
        return self.head or "softmax"

    def head_options(self) -> dict[str, Any]:
        return {"num_mixtures": self.num_mixtures, "num_knots": self.num_knots, "knot_range": self.knot_range}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchConfig:
        """Inverse of :meth:`to_dict`. Unknown keys (e.g. written by a newer version) are reported, not dropped
        silently. ``data`` is what ``config.json`` holds under ``"hf_sparse_attn"``; anything but a JSON object
        there (e.g. a string or a list written by hand) is a ``TypeError`` naming the key."""
        if not isinstance(data, Mapping):
            raise TypeError(
                f'config.json: the "{CONFIG_KEY}" entry must be a JSON object such as '
                f'{{"sparsity": 0.5, "head": null}} (as patch_model writes it); got {type(data).__name__} {data!r}'
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"hf_sparse_attn: ignoring unknown patch-config keys {unknown} (written by hf_sparse_attn "
                f"{data.get('version', '?')}); upgrade hf_sparse_attn to use them",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def check_head_options(num_mixtures: Any, num_knots: Any, knot_range: Any) -> tuple[int, int, float]:
    """The head options as Python numbers (NumPy scalars accepted), or ``TypeError``/``ValueError`` naming the
    option and its allowed values. Shared by :class:`PatchConfig` and :func:`hf_sparse_attn.heads.build_head`."""
    return (
        _check_int(num_mixtures, "num_mixtures", minimum=1),
        _check_int(num_knots, "num_knots", minimum=2),
        _check_bounded(knot_range, "knot_range", KNOT_RANGE_BOUNDS, _KNOT_RANGE_WHY),
    )


def _check_int(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as a Python int (NumPy integers accepted), or TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def _check_bounded(value: Any, name: str, bounds: tuple[float, float], why: str) -> float:
    """``value`` as a Python float (NumPy floats accepted) in ``[low, high]``, or TypeError/ValueError naming
    ``name``, the bounds and ``why`` they hold."""
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [{low:.3g}, {high:.3g}]; got {type(value).__name__} {value!r}")
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name} must be a float in [{low:.3g}, {high:.3g}] ({why}); got {value!r}")
    return value
