"""Perplexity from per-token negative log-likelihoods, as an ``evaluate`` module that needs no Hub.

    perplexity = exp( (1 / N) · Σ_t nll_t ),   nll_t = −log p(x_t | context_t) in nats

over the N scored tokens, whatever batches they arrived in (``add_batch`` collects them; the sum is taken in float64).
Unlike the Hub's ``perplexity`` measurement, which loads a model by name and scores texts itself, this module scores
numbers the caller computed, so it works with any model, context scheme (sliding windows, masked-LM targets) and
device. This file is an ``evaluate`` script, loaded and copied by ``evaluate.load``: it imports only installed
libraries.
"""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Perplexity: exp of the mean negative log-likelihood (nats) of the scored tokens."

_KWARGS_DESCRIPTION = """
Args:
    predictions: the negative log-likelihood, in nats, of each scored token (one float per token).
Returns:
    perplexity: exp(mean nll); nll: the mean nll; num_tokens: how many tokens were scored.
Examples:
    >>> metric = evaluate.load("hf_sparse_attn/training/metrics/perplexity.py")
    >>> metric.compute(predictions=[math.log(2.0), math.log(8.0)])["perplexity"]
    4.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            # no format="numpy": datasets' numpy formatter would hand the values over as float32
            features=datasets.Features({"predictions": datasets.Value("float64")}),
        )

    def _compute(self, predictions):
        nll = np.asarray(predictions, dtype=np.float64)
        if nll.size == 0:
            raise ValueError("predictions: no token was scored; perplexity needs at least one negative log-likelihood")
        if not np.isfinite(nll).all() or (nll < 0).any():
            bad = nll[~np.isfinite(nll) | (nll < 0)][0]
            raise ValueError(f"predictions must be finite negative log-likelihoods >= 0 (nats); got {bad}")
        mean = float(nll.mean())
        return {"perplexity": math.exp(min(mean, 700.0)), "nll": mean, "num_tokens": int(nll.size)}
