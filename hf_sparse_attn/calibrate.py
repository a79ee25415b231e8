"""Choose the r-softmax rate from data: per-layer or per-head rates within an output-change budget.

``calibrate(model, batches, budget=0.01)`` returns rates for ``patch_model(model, sparsity=rates)``.

**Criterion.** The *output change* ``D(rates)`` compares the patched model with the same model under softmax on the
calibration sentences (:data:`MEASURES`): for a model with an LM head, the KL divergence
``KL(p_softmax || p_patched)`` of the output distribution per token (nats); otherwise (an encoder with a task head
or none), the relative squared error ``||h_patched - h||^2 / ||h||^2`` of the final hidden state per token -- the
logits of a task head that has not been fine-tuned yet say nothing. Tokens are averaged per sentence and sentences
are averaged, so ``D`` comes with a standard error. With a ``budget`` the rates are the last point of the search path
below whose ``D`` on the calibration sentences is at most ``budget``; with ``target_sparsity`` they are the first
point whose mean zero fraction reaches the target.

**Search path.** One pass of the softmax model records each layer's queries, keys and values; from them, for every
head ``h`` of layer ``l`` and every rate ``r`` of the grid, the *attention error* ``e[l, h, r]`` (the squared change
of the head's attention output under r-softmax, relative to the layer's attention-output energy) and the zero
fraction ``s[l, h, r]`` among valid keys are computed without further passes. ``L`` more passes measure each layer's
output sensitivity ``c[l] = D(layer l alone at r = 0.5) / sum_h e[l, h, 0.5]``, which puts the attention errors of
different layers on the output's scale. A greedy then raises, one step at a time, the unit (head or layer) whose next
rate costs the least predicted output change ``c[l] * delta e`` per unit of mean sparsity gained (looking ahead to
the best later grid rate, i.e. walking the lower convex hull of each unit's cost curve). In a per-head layer every
head needs a rate once one head has one (a per-head list holds no ``None``), so switching a softmax layer on also
moves its other heads to ``r = 0``, and that step is charged for them. The path runs from softmax everywhere to the
largest grid rate everywhere.

**Cost.** ``1 + L + ceil(log2(N + 1))`` forward passes over the calibration sentences with a budget, where
``N <= units x grid`` is the path length (MiniLM, 6 layers x 12 heads, 19 rates: N <= 1368, at most 1 + 6 + 11 = 18
passes; 256 SST-2 sentences take about 70 CPU seconds on one core); ``1 + L + 1`` with a ``target_sparsity``, which
only measures the chosen point. Outputs of the softmax model
are kept between passes when they fit in :data:`REFERENCE_CACHE_BYTES` (hidden states always do; an LM's
``tokens x vocabulary`` log-probabilities may not), otherwise each evaluation runs the softmax model again.

**Monotone by construction.** The path does not depend on the budget, and the point is found by bisection over the
path index with the test ``D(n) <= budget``: for a larger budget every test that passed still passes, so the
bisection ends at the same or a later point, whose rates are equal or larger everywhere; the zero fraction of a row
never decreases with ``r``, so neither does the mean sparsity. Bisection also ends next to a point that exceeds the
budget (``D(n + 1) > budget`` unless ``n`` is the end of the path).

**Causal models.** A query row of a causal model has as many valid keys as its position plus one, and r-softmax
zeros about ``r (k - 1)`` of ``k`` keys, so the zero fraction at a given ``r`` is lower than in an encoder, and the
first rows stay dense. Every sparsity here is the measured zero fraction among valid keys (not ``r``), and errors
are averaged over valid query rows only, so a target sparsity means the same thing for GPT-2 as for BERT.

Examples::

    >>> rates = hf_sparse_attn.calibrate(model, batches, budget=0.01, granularity="head")
    >>> hf_sparse_attn.patch_model(model, sparsity=rates)
    >>> print(rates.report.table())
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from numbers import Real
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from hf_sparse_attn import attention
from hf_sparse_attn.architectures import is_causal, self_attention_modules
from hf_sparse_attn.calibration_report import CalibrationReport
from hf_sparse_attn.config import layer_rates
from hf_sparse_attn.ops import r_softmax
from hf_sparse_attn.patch import get_patch_config, patch_model, set_sparsity, unpatch_model

#: output-change measures: ``"kl"`` (LM head: KL of the output distribution per token, nats; for a classifier,
#: of its label distribution per sentence), ``"hidden"`` (relative squared error of the final hidden state per
#: token), ``"auto"`` (``"kl"`` when the model has an LM head, else ``"hidden"``)
MEASURES = ("auto", "kl", "hidden")
GRANULARITIES = ("layer", "head")
#: default rate grid: 0.05, 0.10, ..., 0.95
GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
DEFAULT_BUDGET = 0.01
#: the rate at which each layer's output sensitivity is measured
PROBE_RATE = 0.5
#: softmax-model outputs are kept in memory between passes up to this size
REFERENCE_CACHE_BYTES = 1 << 30

#: attention implementation used for the recording pass: softmax attention that hands scores to a per-layer probe
RECORDING_ATTENTION = "hf_sparse_attn_calibration"
_PROBE_ATTR = "_hf_sparse_attn_probe"
_NOT_INPUTS = ("labels", "label")


class CalibratedRates(list):
    """The rates chosen by :func:`calibrate`: a per-layer list that ``patch_model(model, sparsity=...)`` accepts
    (``None`` keeps softmax in a layer; per-head lists for ``granularity="head"``), with the
    :class:`~hf_sparse_attn.calibration_report.CalibrationReport` of the calibration as ``.report``."""

    report: CalibrationReport

    def __init__(self, rates: Iterable[Any], report: CalibrationReport) -> None:
        super().__init__(rates)
        self.report = report


def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    budget: float | None = None,
    granularity: str = "head",
    target_sparsity: float | None = None,
    *,
    measure: str = "auto",
    grid: Sequence[float] = GRID,
) -> CalibratedRates:
    """The largest r-softmax rates whose output change on ``batches`` stays within ``budget``, per layer or head.

    See the module docstring for the criterion, the search and its cost. The model is left as it was (patched or
    not, with its rates, head and train/eval mode); calibration runs in eval mode without gradients.

    Args:
        model: a transformers BERT, RoBERTa or GPT-2 model, patched or not.
        batches: calibration inputs, e.g. a few hundred sentences in padded batches
            ``{"input_ids": [B, T], "attention_mask": [B, T], ...}``; labels are ignored. Iterated several times.
        budget: largest output change allowed (:data:`MEASURES`), >= 0; default 0.01 unless ``target_sparsity``.
        granularity: ``"head"`` (one rate per head) or ``"layer"`` (one rate per layer).
        target_sparsity: instead of a budget, the mean zero fraction (over layers and heads, among valid keys) to
            reach with the smallest predicted output change; in ``(0, 1]``.
        measure: ``"auto"``, ``"kl"`` or ``"hidden"`` (:data:`MEASURES`).
        grid: candidate rates, increasing, in ``(0, 1]``.

    Returns:
        :class:`CalibratedRates`: the rates (a list, one entry per layer) with ``.report``.

    Examples::

        >>> rates = calibrate(model, batches, budget=0.01, granularity="head")
        >>> patch_model(model, sparsity=rates)
        >>> calibrate(model, batches, target_sparsity=0.6).report.output_change
    """
    if budget is not None and target_sparsity is not None:
        raise ValueError("give either budget or target_sparsity, not both")
    if budget is None and target_sparsity is None:
        budget = DEFAULT_BUDGET
    search = RateSearch(model, batches, granularity=granularity, measure=measure, grid=grid)
    return search.solve(budget=budget, target_sparsity=target_sparsity)


class RateSearch:
    """The budget-independent part of :func:`calibrate`: the recording pass, the layer sensitivities and the search
    path. :meth:`solve` then answers any number of budgets or targets, reusing the output changes it has measured.

    Args: as :func:`calibrate`.

    Examples::

        >>> search = RateSearch(model, batches, granularity="head")
        >>> [search.solve(budget=b).report.mean_sparsity for b in (0.001, 0.01, 0.1)]  # non-decreasing
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, torch.Tensor]],
        *,
        granularity: str = "head",
        measure: str = "auto",
        grid: Sequence[float] = GRID,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
        self.granularity = granularity
        self.grid = _check_grid(grid)
        #: rate of each level: 0 is r = 0 (a head of a per-head layer that is not sparsified), 1.. the grid
        self.level_rates = (0.0, *self.grid)
        self.measurer = _Measurer(model, batches, measure)
        self.num_layers, self.num_heads = len(self.measurer.modules), model.config.num_attention_heads
        with _calibration_mode(model):
            profile = self.measurer.record([[torch.tensor(rate) for rate in self.level_rates]] * self.num_layers)
            self.errors, self.zeros = profile.errors(), profile.zero_fractions()  # (L, H, K) each
            self.layer_weights = self._layer_sensitivities()
        self.steps, self.path_sparsity = _greedy_path(
            self.errors * self.layer_weights[:, None, None], self.zeros, per_head=granularity == "head"
        )
        self._changes: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}  # path index -> (mean, standard error)

    @property
    def path_length(self) -> int:
        """Number of steps ``N`` of the search path (its points are 0 .. N)."""
        return len(self.steps)

    @property
    def forward_passes(self) -> int:
        """Forward passes over the calibration sentences so far."""
        return self.measurer.forward_passes

    def levels(self, index: int) -> list[list[int]]:
        """``[layer][head]`` level at path point ``index``: -1 softmax, else an index into :attr:`level_rates`."""
        levels = [[-1] * self.num_heads for _ in range(self.num_layers)]
        for layer, heads, level in self.steps[:index]:
            if max(levels[layer]) < 0:  # the layer switches to r-softmax: all its heads need a rate
                levels[layer] = [0] * self.num_heads
            for head in heads:
                levels[layer][head] = level
        return levels

    def rates(self, index: int) -> list[Any]:
        """The rates at path point ``index`` in the form ``patch_model`` accepts."""
        rates: list[Any] = []
        for row in self.levels(index):
            if max(row) < 0:
                rates.append(None)
            elif self.granularity == "layer":
                rates.append(self.level_rates[row[0]])
            else:
                rates.append([self.level_rates[level] for level in row])
        return rates

    def output_change(self, index: int) -> tuple[float, float]:
        """``(mean, standard error)`` of the output change at path point ``index`` on the calibration sentences
        (measured once, then remembered)."""
        if index not in self._changes:
            with _calibration_mode(self.measurer.model):
                self._changes[index] = self.measurer.output_change(self.rates(index))
        return self._changes[index]

    def solve(self, budget: float | None = None, target_sparsity: float | None = None) -> CalibratedRates:
        """The rates for ``budget`` (:meth:`index_for_budget`) or for ``target_sparsity``
        (:meth:`index_for_sparsity`), with their report."""
        if (budget is None) == (target_sparsity is None):
            raise ValueError("give exactly one of budget and target_sparsity")
        index = self.index_for_budget(budget) if budget is not None else self.index_for_sparsity(target_sparsity)
        levels = self.levels(index)
        head_rates = [[None if level < 0 else self.level_rates[level] for level in row] for row in levels]
        change = self.output_change(index)
        report = self.measurer.report(self.rates(index), head_rates, self.errors, self.zeros, levels, change)
        report.granularity, report.budget, report.target_sparsity = self.granularity, budget, target_sparsity
        report.forward_passes = self.forward_passes
        return CalibratedRates(report.rates, report)

    def index_for_budget(self, budget: float) -> int:
        """The path point chosen for ``budget``: bisection over ``0 .. N`` with the test ``D(n) <= budget``, from
        ``D(0) = 0`` (softmax). The result ``n`` has ``D(n) <= budget`` and ``D(n + 1) > budget`` (or ``n = N``)."""
        budget = _check_number(budget, "budget", low=0.0, high=math.inf, open_low=False)
        feasible, infeasible = 0, self.path_length + 1  # N + 1 is a sentinel past the end
        while infeasible - feasible > 1:
            middle = (feasible + infeasible) // 2
            if self.output_change(middle)[0] <= budget:
                feasible = middle
            else:
                infeasible = middle
        return feasible

    def index_for_sparsity(self, target_sparsity: float) -> int:
        """The first path point whose mean zero fraction on the calibration sentences is at least the target."""
        target = _check_number(target_sparsity, "target_sparsity", low=0.0, high=1.0, open_low=True)
        index = next((n for n, sparsity in enumerate(self.path_sparsity) if sparsity >= target), None)
        if index is None:
            raise ValueError(
                f"target_sparsity={target} is not reachable with rates up to {self.grid[-1]}: the largest mean zero "
                f"fraction on these sentences is {self.path_sparsity[-1]:.4f}; add larger rates to the grid or "
                "lower the target"
            )
        return index

    def _layer_sensitivities(self) -> torch.Tensor:
        """``c[l]``: output change with only layer ``l`` at :data:`PROBE_RATE`, per unit of its attention error."""
        level = min(range(1, len(self.level_rates)), key=lambda k: abs(self.level_rates[k] - PROBE_RATE))
        weights = torch.zeros(self.num_layers, dtype=torch.float64)
        for layer in range(self.num_layers):
            rates: list[Any] = [None] * self.num_layers
            rates[layer] = self.level_rates[level]
            error = float(self.errors[layer, :, level].sum())
            weights[layer] = self.measurer.output_change(rates)[0] / error if error > 0 else 0.0
        return weights


@torch.no_grad()
def measure_calibration(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], rates: Any, *, measure: str = "auto"
) -> CalibrationReport:
    """Measure given ``rates`` on ``batches`` (e.g. held-out sentences): per head the zero fraction and attention
    error, and the model's output change, defined exactly as in :func:`calibrate`'s report. Two forward passes.

    Args:
        model: a transformers BERT, RoBERTa or GPT-2 model, patched or not (left as it was).
        batches: inputs as for :func:`calibrate`.
        rates: any ``sparsity`` that ``patch_model`` accepts, e.g. what :func:`calibrate` returned.
        measure: ``"auto"``, ``"kl"`` or ``"hidden"`` (:data:`MEASURES`).

    Examples::

        >>> rates = calibrate(model, calibration_batches, budget=0.01)
        >>> measure_calibration(model, held_out_batches, rates).output_change  # about the budget or below
    """
    measurer = _Measurer(model, batches, measure)
    heads = model.config.num_attention_heads
    per_layer = layer_rates(rates, len(measurer.modules))
    head_rates = [[None] * heads if r is None else r if isinstance(r, list) else [r] * heads for r in per_layer]
    with _calibration_mode(model):
        profile = measurer.record([[] if r is None else [torch.tensor(r, dtype=torch.float32)] for r in per_layer])
        change = measurer.output_change(per_layer)
    levels = [[-1 if r is None else 0] * heads for r in per_layer]  # candidate 0 of each sparse layer
    return measurer.report(per_layer, head_rates, profile.errors(), profile.zero_fractions(), levels, change)


class _Measurer:
    """Runs a model on fixed sentences: recording passes under softmax (profiles of candidate rates and the outputs
    to compare against) and output changes of given rates. Methods expect :func:`_calibration_mode`."""

    def __init__(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], measure: str) -> None:
        self.model = model
        self.modules = self_attention_modules(model)  # validates the model type
        self.measure = _resolve_measure(model, measure)
        self.batches = _prepare_batches(batches, next(model.parameters()).device)
        self.references: list[torch.Tensor | None] = []
        self.forward_passes = 0

    def record(self, candidates: list[list[torch.Tensor]]) -> _Profile:
        """One pass under softmax: the profile of ``candidates[layer]`` (rates, scalar or ``[H]``), and the outputs
        that :meth:`output_change` compares with (kept up to :data:`REFERENCE_CACHE_BYTES`)."""
        profile = _Profile(candidates, self.model.config.num_attention_heads)
        self.references, cached = [], 0
        set_sparsity(self.model, None)
        with _recording(self.model, self.modules, profile):
            for batch in self.batches:
                profile.row_mask = batch["attention_mask"].bool()
                value = self._output(batch)
                cached += value.numel() * value.element_size()
                self.references.append(value if cached <= REFERENCE_CACHE_BYTES else None)
        self.forward_passes += 1
        return profile

    def output_change(self, rates: list[Any]) -> tuple[float, float]:
        """``(mean, standard error)`` over sentences of the output change of ``rates`` against softmax."""
        changes, recomputed = [], False
        for batch, reference in zip(self.batches, self.references, strict=True):
            if reference is None:
                set_sparsity(self.model, None)
                reference, recomputed = self._output(batch), True
            set_sparsity(self.model, rates)
            changes.append(_per_sentence_change(self._output(batch), reference, batch["attention_mask"], self.measure))
        self.forward_passes += 1 + recomputed
        changes = torch.cat(changes)  # (sentences,)
        error = float(changes.std() / math.sqrt(len(changes))) if len(changes) > 1 else 0.0
        return float(changes.mean()), error

    def report(
        self,
        rates: list[Any],
        head_rates: list[list[float | None]],
        errors: torch.Tensor,
        zeros: torch.Tensor,
        levels: list[list[int]],
        change: tuple[float, float],
    ) -> CalibrationReport:
        """A report of ``rates`` from profile tables ``[L, H, K]`` read at ``levels[layer][head]`` (-1: softmax)."""

        def read(table: torch.Tensor) -> list[list[float]]:
            return [
                [0.0 if k < 0 else float(table[i, h, k]) for h, k in enumerate(row)] for i, row in enumerate(levels)
            ]

        return CalibrationReport(
            model_type=self.model.config.model_type,
            causal=is_causal(self.model),
            measure=self.measure,
            rates=list(rates),
            head_rates=head_rates,
            zero_fraction=read(zeros),
            attention_error=read(errors),
            output_change=change[0],
            output_change_se=change[1],
            num_sentences=sum(len(batch["input_ids"]) for batch in self.batches),
        )

    def _output(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """What the output change compares: log-probabilities (``"kl"``) or the final hidden state (``"hidden"``)."""
        outputs = self.model(**batch, output_hidden_states=True)
        if self.measure == "kl":
            return torch.log_softmax(outputs.logits.float(), dim=-1)
        return outputs.hidden_states[-1].float()


class _Profile:
    """Sums over valid query rows, per layer, candidate rate and head: the squared change of the attention output
    and the zero fraction among valid keys; per layer the attention-output energy and the number of rows."""

    def __init__(self, candidates: list[list[torch.Tensor]], num_heads: int) -> None:
        self.candidates = candidates
        size = (len(candidates), num_heads, max(len(c) for c in candidates))
        self.squared_change = torch.zeros(size, dtype=torch.float64)  # (L, H, K)
        self.zeros = torch.zeros(size, dtype=torch.float64)  # (L, H, K)
        self.energy = torch.zeros(len(candidates), dtype=torch.float64)  # (L,)
        self.rows = torch.zeros(len(candidates), dtype=torch.float64)  # (L,)
        self.row_mask: torch.Tensor | None = None  # (B, T): the non-padded query rows of the current batch

    def errors(self) -> torch.Tensor:
        """``[L, H, K]`` attention error: squared change relative to the layer's attention-output energy."""
        return self.squared_change / self.energy.clamp(min=torch.finfo(torch.float64).tiny)[:, None, None]

    def zero_fractions(self) -> torch.Tensor:
        """``[L, H, K]`` mean fraction of exact zeros among valid keys over the non-padded query rows."""
        return self.zeros / self.rows.clamp(min=1)[:, None, None]

    def observe(
        self,
        layer: int,
        module: nn.Module,
        scores: torch.Tensor,
        valid: torch.Tensor | None,
        value: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        """Called by the recording attention with the softmax layer's scores ``[B, H, T, S]``, its valid-key mask
        (broadcastable, or None), values ``[B, H, S, D]`` and output ``[B, H, T, D]``."""
        rows = self.row_mask[:, None, -scores.shape[2] :].to(torch.float64)  # (B, 1, T)
        valid_keys = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand_as(scores)
        counts = valid_keys.sum(-1).clamp(min=1)  # (B, H, T)
        self.energy[layer] += (output.double().square().sum(-1) * rows).sum().cpu()
        self.rows[layer] += rows.sum().cpu()
        eps = getattr(module, attention.EPS_ATTR, 1e-8)
        for index, rate in enumerate(self.candidates[layer]):
            rate = rate.to(scores.device).view(1, -1, 1, 1) if rate.dim() == 1 else float(rate)
            probs = r_softmax(scores, rate, mask=valid, eps=eps)  # (B, H, T, S)
            change = (torch.matmul(probs.to(value.dtype), value) - output).double().square().sum(-1)  # (B, H, T)
            self.squared_change[layer, :, index] += (change * rows).sum((0, 2)).cpu()
            fraction = ((probs == 0) & valid_keys).sum(-1) / counts  # (B, H, T)
            self.zeros[layer, :, index] += (fraction.double() * rows).sum((0, 2)).cpu()


def _recording_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The patched model's own attention (softmax while recording), handing each layer's scores to its probe."""
    output, weights = attention.sparse_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )  # (B, T, H, D)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    valid, bias = attention.mask_parts(
        attention_mask, module, query.shape[-2], key.shape[-2], query.device, kwargs.get("is_causal")
    )
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # (B, H, T, S)
    scores = scores if bias is None else scores + bias
    getattr(module, _PROBE_ATTR)(module, scores, valid, value, output.transpose(1, 2))
    return output, weights


AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
AttentionMaskInterface.register(RECORDING_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[attention.ATTENTION_NAME])


@contextmanager
def _recording(model: nn.Module, modules: list[nn.Module], profile: _Profile) -> Iterator[None]:
    """Within the block the model runs :func:`_recording_attention`, reporting every layer to ``profile``."""
    for layer, module in enumerate(modules):
        setattr(module, _PROBE_ATTR, lambda *args, layer=layer: profile.observe(layer, *args))
    model.set_attn_implementation(RECORDING_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(attention.ATTENTION_NAME)
        for module in modules:
            delattr(module, _PROBE_ATTR)


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Patched (softmax everywhere if it was not), eval mode, no gradient; afterwards exactly as before."""
    config = get_patch_config(model)
    was_training = model.training
    if config is None:
        patch_model(model, sparsity=None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if config is None:
            unpatch_model(model)
        else:
            set_sparsity(model, config.sparsity)
        model.train(was_training)


def _greedy_path(
    cost: torch.Tensor, zeros: torch.Tensor, *, per_head: bool
) -> tuple[list[tuple[int, tuple[int, ...], int]], list[float]]:
    """Steps ``(layer, heads, level)`` from softmax everywhere to the last level everywhere, the cheapest predicted
    cost per gain of mean zero fraction first, and the mean zero fraction at every point (index 0: no step yet).

    ``cost`` and ``zeros`` are ``[L, H, K]`` over levels 0 (r = 0) .. K - 1; a softmax head costs 0 and has no zeros.
    Each unit (a head, or all heads of a layer) jumps to the level with the best ratio among all its higher levels.
    """
    num_layers, num_heads, num_levels = cost.shape
    cost, gain = cost.tolist(), (zeros / (num_layers * num_heads)).tolist()
    if per_head:
        units = [(layer, (head,)) for layer in range(num_layers) for head in range(num_heads)]
    else:
        units = [(layer, tuple(range(num_heads))) for layer in range(num_layers)]
    levels = [[-1] * num_heads for _ in range(num_layers)]

    def current(table: list, layer: int, head: int) -> float:
        level = levels[layer][head]
        return 0.0 if level < 0 else table[layer][head][level]

    def best_jump(unit: int) -> tuple[float, int] | None:
        layer, heads = units[unit]
        # switching a softmax layer on gives its other heads r = 0: charge their cost and zeros to this step
        others = [h for h in range(num_heads) if h not in heads] if max(levels[layer]) < 0 else []
        base_cost = sum(cost[layer][h][0] for h in others) - sum(current(cost, layer, h) for h in heads)
        base_gain = sum(gain[layer][h][0] for h in others) - sum(current(gain, layer, h) for h in heads)
        best = None
        for level in range(max(1, levels[layer][heads[0]] + 1), num_levels):
            delta_gain = base_gain + sum(gain[layer][h][level] for h in heads)
            if delta_gain > 0:
                ratio = (base_cost + sum(cost[layer][h][level] for h in heads)) / delta_gain
                if best is None or ratio < best[0]:
                    best = (ratio, level)
        return best

    version = [0] * len(units)
    heap: list[tuple[float, int, int, int]] = []  # (cost per gain, unit, level, version of the unit)

    def push(unit: int) -> None:
        version[unit] += 1
        jump = best_jump(unit)
        if jump is not None:
            heapq.heappush(heap, (jump[0], unit, jump[1], version[unit]))

    for unit in range(len(units)):
        push(unit)
    steps: list[tuple[int, tuple[int, ...], int]] = []
    sparsity = [0.0]
    while heap:
        _, unit, level, stamp = heapq.heappop(heap)
        if stamp != version[unit]:
            continue  # the unit's layer changed since this entry was pushed
        layer, heads = units[unit]
        if max(levels[layer]) < 0:
            levels[layer] = [0] * num_heads
        for head in heads:
            levels[layer][head] = level
        steps.append((layer, heads, level))
        sparsity.append(sum(current(gain, i, h) for i in range(num_layers) for h in range(num_heads)))
        for other, (other_layer, _) in enumerate(units):
            if other_layer == layer:
                push(other)
    return steps, sparsity


def _per_sentence_change(
    output: torch.Tensor, reference: torch.Tensor, attention_mask: torch.Tensor, measure: str
) -> torch.Tensor:
    """``[B]`` output change per sentence: per token (``[B, T, ...]`` outputs) averaged over non-padded tokens."""
    if measure == "kl":
        change = (reference.exp() * (reference - output)).sum(-1)  # KL(p_softmax || p_patched): (B, T) or (B,)
    else:
        change = (output - reference).square().sum(-1) / reference.square().sum(-1).clamp(min=1e-30)  # (B, T)
    if change.dim() == 1:  # one output per sentence (a classifier's labels)
        return change.double().cpu()
    tokens = attention_mask[:, -change.shape[1] :].to(change.dtype)  # (B, T)
    return ((change * tokens).sum(-1) / tokens.sum(-1).clamp(min=1)).double().cpu()


def _resolve_measure(model: nn.Module, measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}")
    if measure == "auto":
        return "kl" if isinstance(model.get_output_embeddings(), nn.Linear) else "hidden"
    if measure == "kl" and not hasattr(model, "classifier") and model.get_output_embeddings() is None:
        raise ValueError(
            f"measure='kl' needs output logits (an LM head or a classifier); {type(model).__name__} has none: "
            "use measure='hidden'"
        )
    return measure


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or not grid:
        raise TypeError(f"grid must be a non-empty sequence of rates in (0, 1]; got {grid!r}")
    values = tuple(_check_number(r, f"grid[{i}]", low=0.0, high=1.0, open_low=True) for i, r in enumerate(grid))
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"grid must be strictly increasing; got {list(values)}")
    return values


def _check_number(value: Any, name: str, *, low: float, high: float, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    value = float(value)
    bracket = "(" if open_low else "["
    if math.isnan(value) or value < low or (open_low and value == low) or value > high:
        raise ValueError(f"{name} must lie in {bracket}{low:g}, {high:g}]; got {value}")
    return value


def _prepare_batches(batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device) -> list[dict]:
    """The batches as a list of model inputs on ``device``, each with an ``attention_mask``."""
    if isinstance(batches, Mapping):
        batches = [batches]
    prepared = []
    for index, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                f"batches[{index}] must be a dict of model inputs with 'input_ids' [batch, tokens] (a tensor); "
                f"got {type(batch).__name__}"
            )
        inputs = {k: v.to(device) for k, v in batch.items() if k not in _NOT_INPUTS and isinstance(v, torch.Tensor)}
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
        prepared.append(inputs)
    if not prepared:
        raise ValueError("batches is empty: give at least one batch of calibration sentences")
    return prepared
