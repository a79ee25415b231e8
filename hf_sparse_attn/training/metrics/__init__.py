"""Metrics as ``evaluate`` modules that ship inside the package, so they load offline.

``evaluate.load("glue", "sst2")`` fetches its script from the Hub, which machines without internet cannot reach.
The scripts here are ordinary ``evaluate`` metric modules: :func:`load_glue_metric` and :func:`load_perplexity_metric`
return ``evaluate.EvaluationModule`` objects (``compute``, ``add_batch``, ``evaluate.combine``), and the paths work
with ``evaluate.load`` directly.

Examples::

    >>> import evaluate
    >>> from hf_sparse_attn.training.metrics import GLUE_SCRIPT, load_glue_metric
    >>> load_glue_metric("mrpc").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'f1': 0.6666666666666666}
    >>> evaluate.load(GLUE_SCRIPT, config_name="cola")  # the same module
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import evaluate
import numpy as np
import torch
from transformers import EvalPrediction

_HERE = Path(__file__).resolve().parent
#: the GLUE metric script (same configs, keys and numbers as the Hub's ``glue`` metric)
GLUE_SCRIPT = str(_HERE / "glue.py")
#: the perplexity metric script: exp of the mean negative log-likelihood of the scored tokens
PERPLEXITY_SCRIPT = str(_HERE / "perplexity.py")


def load_glue_metric(task_name: str, **kwargs) -> evaluate.EvaluationModule:
    """The GLUE metric of ``task_name`` (``cola``, ``sst2``, ``mrpc``, ``stsb``, ``rte``, ``qnli``, ...), loaded from
    the packaged script, in memory (no cache files, so concurrent processes cannot collide); ``kwargs`` go to
    ``evaluate.load``."""
    return evaluate.load(GLUE_SCRIPT, config_name=task_name, **{"keep_in_memory": True, **kwargs})


def load_perplexity_metric(**kwargs) -> evaluate.EvaluationModule:
    """The packaged perplexity metric, in memory; ``kwargs`` go to ``evaluate.load``."""
    return evaluate.load(PERPLEXITY_SCRIPT, **{"keep_in_memory": True, **kwargs})


def glue_compute_metrics(config_name: str, is_regression: bool) -> Callable[[EvalPrediction], dict[str, float]]:
    """A Trainer ``compute_metrics``: the argmax of the logits (regression: the single output) scored against the
    labels by the packaged GLUE metric of ``config_name``.

    Examples::

        >>> trainer = Trainer(..., compute_metrics=glue_compute_metrics("mrpc", False))  # eval_accuracy, eval_f1
    """
    metric = load_glue_metric(config_name)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = logits.reshape(-1) if is_regression else logits.argmax(-1)  # (N,)
        return metric.compute(predictions=predictions, references=prediction.label_ids)

    return compute


def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Negative log-likelihood (nats) of each label under the model, aligned with ``labels``: ``[B, T]``.

    Causal LMs predict ``labels[:, t]`` from ``logits[:, t - 1]`` (position 0 has no prediction and gets 0); masked
    LMs predict ``labels[:, t]`` from ``logits[:, t]``. Positions whose label is -100 get 0 and are left out by
    :func:`perplexity_compute_metrics`. ``log_softmax`` leaves the log-probabilities of our LM heads unchanged.
    A Trainer ``preprocess_logits_for_metrics``, so evaluation keeps ``[B, T]`` numbers instead of ``[B, T, V]``
    logits.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    if causal:
        log_probs, targets = log_probs[:, :-1], labels[:, 1:]  # [B, T-1, V], [B, T-1]
    else:
        targets = labels
    nll = -log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)  # [B, T'] (-100 -> id 0, masked later)
    # clamp: the NLL is >= 0, but log_softmax of a head's log-probabilities can round to +1e-7 for p ~ 1
    nll = nll.masked_fill(targets == -100, 0.0).clamp(min=0.0)
    return torch.nn.functional.pad(nll, (1, 0)) if causal else nll  # [B, T]


def perplexity_compute_metrics(causal: bool) -> tuple[Callable, Callable[[EvalPrediction], dict[str, float]]]:
    """``(preprocess_logits_for_metrics, compute_metrics)`` for a Trainer that reports ``eval_perplexity``:
    exp of the mean NLL over every scored token of the evaluation set (labels other than -100; for a causal LM
    every position but the first of a block), computed by the packaged perplexity metric. Unlike exp(eval_loss),
    a mean of per-batch means, it weighs every token equally also when batches hold different numbers of masked
    tokens (masked LM).

    Examples::

        >>> preprocess, compute = perplexity_compute_metrics(causal=True)
        >>> trainer = Trainer(..., preprocess_logits_for_metrics=preprocess, compute_metrics=compute)
    """
    metric = load_perplexity_metric()

    def preprocess(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
        logits = logits[0] if isinstance(logits, tuple) else logits
        return token_nll(logits, labels, causal=causal)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        nll, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)  # [N, T] each
        scored = labels != -100
        if causal:
            scored[:, 0] = False
        return {"perplexity": metric.compute(predictions=nll[scored].astype(np.float64))["perplexity"]}

    return preprocess, compute


__all__ = [
    "GLUE_SCRIPT",
    "PERPLEXITY_SCRIPT",
    "glue_compute_metrics",
    "load_glue_metric",
    "load_perplexity_metric",
    "perplexity_compute_metrics",
    "token_nll",
]
