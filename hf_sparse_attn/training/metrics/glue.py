"""GLUE metric (Wang et al., ICLR 2019, arXiv 1804.07461) as an ``evaluate`` module that needs no Hub.

The configurations, output keys, input types and formulas are those of the Hub's ``glue`` metric, so
``evaluate.load(<this file>, config_name=task)`` gives the same numbers as ``evaluate.load("glue", task)``:

- cola: Matthews correlation, (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) (scikit-learn).
- mrpc, qqp: accuracy and F1 of the positive class (label 1), F1 = 2·P·R / (P + R) (scikit-learn).
- stsb: Pearson and Spearman correlation of scores and gold similarities (SciPy), both cast to float32 first as the
  Hub module's features do.
- every other task: accuracy, the fraction of predictions equal to the reference.

This file is an ``evaluate`` script, loaded and copied by ``evaluate.load``: it imports only installed libraries.
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = "The metric of each GLUE task (https://gluebenchmark.com/), computed offline."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids (regression for stsb: predicted scores).
    references: gold label ids (stsb: gold scores).
Returns, depending on the task:
    cola: {"matthews_correlation"}; mrpc, qqp: {"accuracy", "f1"}; stsb: {"pearson", "spearmanr"};
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans: {"accuracy"}.
Examples:
    >>> metric = evaluate.load("hf_sparse_attn/training/metrics/glue.py", config_name="mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
TASKS = ("cola", "stsb", "mrpc", "qqp", *ACCURACY_TASKS)


def accuracy(predictions, references):
    return float((predictions == references).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self):
        if self.config_name not in TASKS:
            raise ValueError(f"config_name must be one of {', '.join(TASKS)}; got {self.config_name!r}")
        value = "float32" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(value), "references": datasets.Value(value)}),
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if self.config_name == "cola":
            return {"matthews_correlation": matthews_corrcoef(references, predictions)}
        if self.config_name == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if self.config_name in ("mrpc", "qqp"):
            return {
                "accuracy": accuracy(predictions, references),
                "f1": float(f1_score(y_true=references, y_pred=predictions)),
            }
        return {"accuracy": accuracy(predictions, references)}
