"""LM heads that escape the softmax bottleneck: sigsoftmax, mixtures of softmaxes / sigsoftmaxes, and PLIF.

Each head replaces a model's output-embedding ``nn.Linear`` (``model.get_output_embeddings()``) and returns
normalised **log-probabilities** `[..., V]` (float32) in the place of logits. ``log_softmax`` of log-probabilities
is the identity, so transformers' own losses, ``generate()`` (greedy, sampling, beam search) and pipelines work
unchanged (DESIGN §2).

Every head *is* an ``nn.Linear`` (a subclass) holding the original ``weight`` and ``bias`` Parameter objects under
the same names, so tied input/output embeddings stay tied and ``save_pretrained`` writes the usual keys. The
parameters a head adds live in one small child module, ``extra`` (e.g. ``lm_head.extra.theta``), so PEFT can
train and save just them with ``modules_to_save=["lm_head.extra"]`` without copying the vocabulary-sized weight.

=============  =======================================================  ===================
name           log P(y | h)                                             new parameters
=============  =======================================================  ===================
"sigsoftmax"   log sigsoftmax(W h + b)_y                                0
"mos"          log sum_k pi_k(h) softmax(W tanh(P_k h) + b)_y           K*D*D + K*D
"moss"         log sum_k pi_k(h) sigsoftmax(W tanh(P_k h) + b)_y        K*D*D + K*D
"plif"         log softmax(f(W h + b))_y, f monotonic, K knots          K - 1
=============  =======================================================  ===================

with pi(h) = softmax(U h) (U: `[K, D]`, no bias) and D the hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_sparse_attn.config import HEAD_NAMES, check_head_options
from hf_sparse_attn.ops.mixture import log_mixture_linear
from hf_sparse_attn.ops.monotonic import monotonic_transform
from hf_sparse_attn.ops.sigsoftmax import log_sigsoftmax

__all__ = [
    "HEAD_NAMES",
    "MixtureHead",
    "MixtureProjections",
    "MonotonicHead",
    "MonotonicTransform",
    "SigSoftmaxHead",
    "build_head",
    "restore_linear",
]

#: P_k = c * I at initialisation, per component distribution f. tanh caps features at ±1, so the step-0 logits
#: W tanh(c h) are a shrunk (c small) or sign-like (c large) copy of W h; for LayerNorm-scaled hidden states the
#: KL to the pretrained softmax is smallest near c = 3 for softmax and c = 2 for sigsoftmax, which sharpens
#: (measured on tiny GPT-2s, one trained on WikiText-2: MoS KL 0.74 at c = 1 -> 0.27 at c = 3; MoSS 0.30 -> 0.16).
MIXTURE_INIT_SCALE = {"softmax": 3.0, "sigsoftmax": 2.0}
#: relative size of the noise added to the projections so that the components can diverge
MIXTURE_INIT_NOISE = 1e-2


class _LogProbHead(nn.Linear):
    """An ``nn.Linear`` that reuses ``linear``'s weight/bias Parameters and returns log-probabilities."""

    #: the ``head=`` name this class implements
    head_name: str

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a fresh weight
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        if linear.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = linear.bias

    def use_linear(self, linear: nn.Linear) -> None:
        """Sit on top of ``linear`` from now on: take its weight/bias Parameters and sizes, keep the head's own
        parameters (``extra``; none of them depends on the vocabulary size). How a patched model keeps its head
        through ``resize_token_embeddings``, which replaces the output layer by a plain ``nn.Linear``."""
        if linear.in_features != self.in_features:
            raise ValueError(f"linear must take {self.in_features} input features; got {linear.in_features}")
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def reset_parameters(self) -> None:
        """Reset the head's own parameters to their step-0 values. The shared ``weight``/``bias`` are left alone:
        they belong to (and are tied with) the pretrained model."""
        if hasattr(self, "extra"):
            self.extra.reset_parameters()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The plain linear logits ``W h + b`` in float32, `[..., D] -> [..., V]`."""
        return F.linear(hidden, self.weight, self.bias).float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, head={self.head_name!r}"


class SigSoftmaxHead(_LogProbHead):
    r"""log sigsoftmax(W h + b): sigsoftmax (Kanai et al. 2018) on the pretrained output layer.

    ``p_y ∝ exp(z_y) * sigmoid(z_y)`` with ``z = W h + b``. Adds **no parameters** (and has no ``extra`` child).
    Not identical to the pretrained softmax at step 0 (sigsoftmax ≈ softmax(2z) for very negative logits), so
    fine-tune after patching.

    Args:
        linear (`nn.Linear`): the model's output embedding; its ``weight``/``bias`` Parameters are reused.

    Examples::

        >>> head = SigSoftmaxHead(nn.Linear(8, 11))  # e.g. SigSoftmaxHead(model.lm_head)
        >>> log_probs = head(torch.randn(2, 3, 8))  # [B, T, V]
        >>> bool(log_probs.logsumexp(-1).abs().max() < 1e-5)
        True
    """

    head_name = "sigsoftmax"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return log_sigsoftmax(self.logits(hidden))


class MonotonicTransform(nn.Module):
    """The learnable monotonic map f of :class:`MonotonicHead` (``extra``): ``num_knots - 1`` slope parameters
    ``theta``; see :func:`hf_sparse_attn.ops.monotonic.monotonic_transform`."""

    def __init__(self, num_knots: int, knot_range: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.knot_range = float(knot_range)
        self.theta = nn.Parameter(torch.empty(num_knots - 1, device=device, dtype=dtype))  # [K-1]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """theta = 0: every slope 1, f is the identity."""
        with torch.no_grad():
            self.theta.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return monotonic_transform(z, self.theta, self.knot_range)

    def extra_repr(self) -> str:
        return f"num_knots={self.theta.numel() + 1}, knot_range={self.knot_range}"


class MonotonicHead(_LogProbHead):
    r"""PLIF (Ganea et al. 2019): log softmax(f(W h + b)) with one learnable, strictly increasing, piecewise-linear f
    shared by all logits.

    f has ``num_knots`` knots on a uniform grid over ``[-knot_range, knot_range]``, slopes
    ``softplus(theta + log(e - 1)) > 0`` on the ``num_knots - 1`` segments between them, and extends linearly outside
    the grid with the edge slopes. Adds **num_knots - 1 parameters** (``extra.theta``, zeros at initialisation).
    At initialisation f is the identity, so the patched model gives exactly the pretrained distribution.

    Args:
        linear (`nn.Linear`): the model's output embedding; its ``weight``/``bias`` Parameters are reused.
        num_knots (`int`, *optional*, defaults to 1000): K >= 2.
        knot_range (`float`, *optional*, defaults to 20.0): T > 0; logits beyond ±T fall on the linear extensions.

    Examples::

        >>> linear = nn.Linear(8, 11)
        >>> head = MonotonicHead(linear, num_knots=1000, knot_range=20.0)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(head(x), linear(x).log_softmax(-1), atol=1e-5)  # the identity at init
        True
    """

    head_name = "plif"

    def __init__(self, linear: nn.Linear, num_knots: int = 1000, knot_range: float = 20.0) -> None:
        super().__init__(linear)
        self.extra = MonotonicTransform(num_knots, knot_range, device=linear.weight.device, dtype=linear.weight.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.extra(self.logits(hidden)), dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_knots={self.extra.theta.numel() + 1}, knot_range={self.extra.knot_range}"


class MixtureProjections(nn.Module):
    """The mixture weights and per-component features of :class:`MixtureHead` (``extra``).

    ``prior`` is U `[K, D]` (pi = softmax(U h)) and ``projections`` is P `[K, D, D]` (a_k = tanh(P_k h)).
    ``init_scale`` is c in the initial P_k = c * I + noise.
    """

    def __init__(
        self, num_mixtures: int, hidden_size: int, init_scale: float = 1.0, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.init_scale = init_scale
        self.prior = nn.Parameter(torch.empty(num_mixtures, hidden_size, device=device, dtype=dtype))  # [K, D]
        self.projections = nn.Parameter(  # [K, D, D]
            torch.empty(num_mixtures, hidden_size, hidden_size, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform prior (U = 0) and P_k = c * I + noise: every component starts as f(W tanh(c h) + b), close to
        the pretrained f(W h + b) (see ``MIXTURE_INIT_SCALE``); the noise (relative size ``MIXTURE_INIT_NOISE``)
        breaks the symmetry between components, which gradients alone would never do."""
        num_mixtures, hidden_size = self.prior.shape
        with torch.no_grad():
            self.prior.zero_()
            noise = torch.randn(self.projections.shape, device=self.projections.device) * (
                MIXTURE_INIT_NOISE / math.sqrt(hidden_size)
            )
            eye = torch.eye(hidden_size, device=self.projections.device)
            self.projections.copy_(eye * self.init_scale + noise)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[N, D]` hidden states -> log pi `[N, K]` (float32) and features tanh(P_k h) `[N, K, D]`."""
        num_mixtures, hidden_size = self.prior.shape
        log_prior = F.linear(hidden, self.prior).float().log_softmax(-1)  # [N, K]
        projected = F.linear(hidden, self.projections.view(num_mixtures * hidden_size, hidden_size))  # [N, K*D]
        return log_prior, torch.tanh(projected).view(-1, num_mixtures, hidden_size)  # [N, K, D]

    def extra_repr(self) -> str:
        return f"num_mixtures={self.prior.shape[0]}, hidden_size={self.prior.shape[1]}, init_scale={self.init_scale}"


class MixtureHead(_LogProbHead):
    r"""Mixture of softmaxes (MoS, Yang et al. 2018) or of sigsoftmaxes (MoSS, Kanai et al. 2018) on the pretrained
    output layer:

        P(y | h) = sum_k pi_k(h) * f(W tanh(P_k h) + b)_y,    pi(h) = softmax(U h),    f = softmax or sigsoftmax.

    Adds **K*D*D + K*D parameters** (``extra.projections`` P `[K, D, D]`, ``extra.prior`` U `[K, D]`); W and b are
    the pretrained (tied) ones. Initialised with a uniform prior and P_k ≈ c * I (c = 3 for MoS, 2 for MoSS; see
    ``MIXTURE_INIT_SCALE``), which keeps the step-0 distribution close to the pretrained one (tanh squashes h, so
    not identical: fine-tune after patching).
    Computed in token chunks, one component at a time (:func:`~hf_sparse_attn.ops.mixture.log_mixture_linear`):
    memory does not grow with K times `[tokens x V]`, in training or inference.

    Args:
        linear (`nn.Linear`): the model's output embedding; its ``weight``/``bias`` Parameters are reused.
        num_mixtures (`int`, *optional*, defaults to 2): K >= 1.
        component (`str`, *optional*, defaults to ``"softmax"``): f; ``"softmax"`` (MoS) or ``"sigsoftmax"`` (MoSS).

    Examples::

        >>> head = MixtureHead(nn.Linear(8, 11, bias=False), num_mixtures=4, component="sigsoftmax")  # MoSS
        >>> sum(p.numel() for p in head.extra.parameters())  # K*D*D + K*D
        288
    """

    def __init__(self, linear: nn.Linear, num_mixtures: int = 2, component: str = "softmax") -> None:
        if component not in _MIXTURE_NAMES:
            raise ValueError(f"component must be one of {sorted(_MIXTURE_NAMES)}; got {component!r}")
        super().__init__(linear)
        self.component = component
        self.extra = MixtureProjections(
            num_mixtures,
            linear.in_features,
            MIXTURE_INIT_SCALE[component],
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    @property
    def head_name(self) -> str:
        return _MIXTURE_NAMES[self.component]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        log_prior, features = self.extra(hidden.reshape(-1, self.in_features))  # [N, K], [N, K, D]
        log_probs = log_mixture_linear(log_prior, features, self.weight, self.bias, component=self.component)
        return log_probs.view(*hidden.shape[:-1], self.out_features)  # [..., V]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_mixtures={self.extra.prior.shape[0]}"


#: mixture component f -> head name
_MIXTURE_NAMES = {"softmax": "mos", "sigsoftmax": "moss"}

#: every name ``build_head`` accepts; "softmax" keeps the plain output layer


def build_head(
    name: str, linear: nn.Linear, *, num_mixtures: int = 2, num_knots: int = 1000, knot_range: float = 20.0
) -> nn.Linear:
    r"""The ``name`` head on top of ``linear`` (a model's output embedding), sharing its weight/bias Parameters.

    ``"softmax"`` returns the plain layer. If ``linear`` is already one of our heads, the new head is built from its
    weight/bias, so patching again replaces the head instead of stacking heads (the old head's parameters are
    dropped).

    Args:
        name (`str`): one of ``"softmax"``, ``"sigsoftmax"``, ``"mos"``, ``"moss"``, ``"plif"``.
        linear (`nn.Linear`): e.g. ``model.get_output_embeddings()``.
        num_mixtures (`int`, *optional*, defaults to 2): K for ``"mos"``/``"moss"``, >= 1.
        num_knots (`int`, *optional*, defaults to 1000): knots of ``"plif"``, >= 2.
        knot_range (`float`, *optional*, defaults to 20.0): ``"plif"`` knots span [-knot_range, knot_range],
            in :data:`hf_sparse_attn.config.KNOT_RANGE_BOUNDS` (> 0, finite in float32).

    Returns:
        `nn.Linear`: the head; its forward maps `[..., D]` hidden states to `[..., V]` log-probabilities.

    Examples::

        >>> lm_head = nn.Linear(8, 11, bias=False)  # e.g. model.get_output_embeddings()
        >>> head = build_head("moss", lm_head, num_mixtures=4)
        >>> head = build_head("plif", head, num_knots=100)  # replaces MoSS
        >>> type(head).__name__, head.weight is lm_head.weight
        ('MonotonicHead', True)
        >>> type(build_head("softmax", head)) is nn.Linear
        True
    """
    if name not in HEAD_NAMES:
        raise ValueError(f"head must be one of {', '.join(map(repr, HEAD_NAMES))}; got {name!r}")
    if not isinstance(linear, nn.Linear):
        raise ValueError(
            f"head={name!r} needs the model's LM head, an nn.Linear (model.get_output_embeddings()); "
            f"got {type(linear).__name__}: the model has no LM head"
        )
    num_mixtures, num_knots, knot_range = check_head_options(num_mixtures, num_knots, knot_range)
    base = restore_linear(linear)
    if name == "softmax":
        return base
    if name == "sigsoftmax":
        return SigSoftmaxHead(base)
    if name == "plif":
        return MonotonicHead(base, num_knots=num_knots, knot_range=knot_range)
    return MixtureHead(base, num_mixtures=num_mixtures, component="softmax" if name == "mos" else "sigsoftmax")


def restore_linear(module: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` sharing ``module``'s weight/bias Parameters (``module`` itself if it is not one of our
    heads). Used to unpatch a model.

    Examples::

        >>> lm_head = nn.Linear(8, 11)
        >>> restored = restore_linear(build_head("mos", lm_head))
        >>> type(restored) is nn.Linear, restored.weight is lm_head.weight, restored.bias is lm_head.bias
        (True, True, True)
    """
    if not isinstance(module, nn.Linear):
        raise TypeError(f"module must be an nn.Linear (an LM head); got {type(module).__name__}")
    if not isinstance(module, _LogProbHead):
        return module
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    linear.weight = module.weight
    linear.bias = module.bias
    return linear
