"""Data for the fine-tuning recipes: GLUE tasks (local TSV release or the Hub), text corpora, and the metrics.

GLUE TSVs are read as plain tab-separated text without CSV quoting: several rows contain or begin with ``"``
(RTE train, MRPC, STS-B), and a quoting reader silently merges or drops rows. MRPC files start with a UTF-8
byte-order mark and CoLA files have no header; :data:`GLUE_TASKS` records each layout. The loaded columns and
label ids are those of the Hub's ``nyu-mll/glue`` dataset, so a local run and a Hub run see the same data.

The metrics are the GLUE ones, as ``evaluate.load("glue", task)`` computes them (accuracy, F1 of the positive
class, Matthews correlation, Pearson and Spearman correlation) with the same scikit-learn / SciPy functions and
key names; ``evaluate`` itself downloads its metric scripts from the Hub, which offline machines cannot reach.
"""

from __future__ import annotations

import csv
import gzip
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import EvalPrediction, PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: metric name (as ``evaluate``'s GLUE metric reports it) -> function of (predictions, references)
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda predictions, references: float(np.mean(predictions == references)),
    "f1": lambda predictions, references: float(f1_score(references, predictions)),
    "matthews_correlation": lambda predictions, references: float(matthews_corrcoef(references, predictions)),
    "pearson": lambda predictions, references: float(pearsonr(predictions, references)[0]),
    "spearmanr": lambda predictions, references: float(spearmanr(predictions, references)[0]),
}


@dataclass(frozen=True)
class GlueTask:
    """Layout and metric of one GLUE task.

    Args:
        directory: folder of the task in the GLUE release (``glue/<directory>/{train,dev}.tsv``).
        header: whether the TSVs start with a header line.
        text_columns: TSV column index of each text field, in the order of ``columns``.
        label_column: TSV column index of the label.
        columns: names of the text fields (those of the Hub dataset).
        tsv_labels: label strings as written in the TSV, in label-id order; empty for regression.
        label_names: human-readable names of the label ids (``id2label``).
        metrics: names in :data:`METRICS`.
    """

    directory: str
    header: bool
    text_columns: tuple[int, ...]
    label_column: int
    columns: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return not self.tsv_labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.tsv_labels)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", False, (3,), 1, ("sentence",), ("0", "1"), ("unacceptable", "acceptable"),
                     ("matthews_correlation",)),
    "sst2": GlueTask("SST-2", True, (0,), 1, ("sentence",), ("0", "1"), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask("MRPC", True, (3, 4), 0, ("sentence1", "sentence2"), ("0", "1"),
                     ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "stsb": GlueTask("STS-B", True, (7, 8), 9, ("sentence1", "sentence2"), (), (), ("pearson", "spearmanr")),
    "rte": GlueTask("RTE", True, (1, 2), 3, ("sentence1", "sentence2"), ("entailment", "not_entailment"),
                    ("entailment", "not_entailment"), ("accuracy",)),
}  # fmt: skip

#: local split file name -> Hub split name
SPLITS = {"train": "train", "dev": "validation"}


def glue_task(name: str) -> GlueTask:
    """The :data:`GLUE_TASKS` entry for ``name``; ``ValueError`` listing the tasks otherwise."""
    if name not in GLUE_TASKS:
        raise ValueError(f"task must be one of {', '.join(GLUE_TASKS)}; got {name!r}")
    return GLUE_TASKS[name]


def read_glue_tsv(path: str | os.PathLike, task: GlueTask) -> dict[str, list]:
    """Read one labelled GLUE TSV (train or dev) into columns ``{*task.columns, "label"}``.

    Labels become ids (the index in ``task.tsv_labels``) or floats for regression. Raises ``ValueError`` naming
    the file and line for a row with too few fields or an unknown label.

    Examples::

        >>> data = read_glue_tsv("glue/RTE/dev.tsv", GLUE_TASKS["rte"])
        >>> len(data["label"]), data["label"][0]
        (277, 1)
    """
    needed = max(*task.text_columns, task.label_column) + 1
    data: dict[str, list] = {name: [] for name in (*task.columns, "label")}
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: MRPC starts with a byte-order mark
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for line, row in enumerate(rows, start=1):
            if task.header and line == 1:
                continue
            if len(row) < needed:
                raise ValueError(f"{path}:{line}: expected at least {needed} tab-separated fields, got {len(row)}")
            for name, column in zip(task.columns, task.text_columns, strict=True):
                data[name].append(row[column])
            data["label"].append(_label(row[task.label_column], task, f"{path}:{line}"))
    return data


def _label(value: str, task: GlueTask, where: str) -> int | float:
    if task.is_regression:
        return float(value)
    if value not in task.tsv_labels:
        raise ValueError(f"{where}: label {value!r} is not one of {task.tsv_labels}")
    return task.tsv_labels.index(value)


def load_glue(task_name: str, data_dir: str | os.PathLike | None = None):
    """GLUE ``train`` and ``validation`` splits as a ``datasets.DatasetDict``.

    ``data_dir`` is the GLUE release folder (holding ``RTE/``, ``SST-2/``, ...) or the task's own folder (holding
    ``train.tsv`` and ``dev.tsv``); without it the task is loaded from the Hub (``nyu-mll/glue``).

    Examples::

        >>> load_glue("rte", "../shared/data/glue")["validation"].num_rows
        277
        >>> load_glue("sst2")  # from the Hub
    """
    import datasets

    task = glue_task(task_name)
    if data_dir is None:
        hub = datasets.load_dataset("nyu-mll/glue", task_name)
        return datasets.DatasetDict({split: hub[split] for split in SPLITS.values()})
    folder = Path(data_dir)
    if not (folder / "train.tsv").is_file():
        folder = folder / task.directory
    files = {split: folder / f"{name}.tsv" for name, split in SPLITS.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(
            f"data_dir: {missing[0]} not found; pass the GLUE folder (holding {task.directory}/) or the task folder"
        )
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(read_glue_tsv(p, task)) for split, p in files.items()}
    )


def glue_metrics(task_name: str) -> Callable[[EvalPrediction], dict[str, float]]:
    """A Trainer ``compute_metrics`` for the task: argmax of the logits (regression: the single output) against
    the labels, scored with the task's :data:`METRICS`.

    Examples::

        >>> trainer = Trainer(..., compute_metrics=glue_metrics("mrpc"))  # reports eval_accuracy, eval_f1
    """
    task = glue_task(task_name)

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = logits.reshape(-1) if task.is_regression else logits.argmax(-1)  # (N,)
        return {name: METRICS[name](predictions, prediction.label_ids) for name in task.metrics}

    return compute


def read_text_lines(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """All lines of one or more text files (``.gz`` read as gzip), line breaks kept.

    Examples::

        >>> lines = read_text_lines(["ptb/ptb.train.txt.gz", "extra.txt"])
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    lines: list[str] = []
    for path in paths:
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines.extend(f)
    return lines


#: special tokens of :func:`word_level_tokenizer`
WORD_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>", "mask_token": "<mask>"}


def word_level_tokenizer(lines: Iterable[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for pre-tokenised corpora (PTB, WikiText): whitespace-separated words, the
    ``vocab_size`` most frequent ones (all by default, special tokens included), the rest ``<unk>``, and ``<eos>``
    appended to every line -- the usual word-level language-modelling convention, so perplexities are per word.

    Examples::

        >>> tokenizer = word_level_tokenizer(read_text_lines("ptb/ptb.train.txt.gz"))
        >>> len(tokenizer)  # PTB's 9,999 words (its own <unk> included) + <eos>, <pad>, <mask>
        10002
        >>> tokenizer.save_pretrained("ptb-tokenizer")
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    # built by hand: tokenizers' WordLevelTrainer leaves a gap in the ids when a word equals a special token
    # (PTB's own "<unk>"), so that the largest id is not len(tokenizer) - 1
    specials = list(WORD_SPECIALS.values())
    counts = Counter(word for line in lines for word in line.split() if word not in specials)
    words = sorted(counts, key=lambda word: (-counts[word], word))
    if vocab_size is not None:
        words = words[: max(0, vocab_size - len(specials))]
    vocab = {token: index for index, token in enumerate(specials + words)}  # ids 0 .. len(vocab) - 1
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=WORD_SPECIALS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = WORD_SPECIALS["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **WORD_SPECIALS)


def split_lines(lines: Sequence[str], percentage: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``percentage`` % of ``lines`` (at least one line) for evaluation: ``(train, held_out)``.

    Examples::

        >>> train, valid = split_lines(read_text_lines("wiki.train.tokens.gz"), 5)
    """
    if not 0 < percentage < 100:
        raise ValueError(f"validation_split_percentage must be in (0, 100); got {percentage}")
    cut = len(lines) - max(1, round(len(lines) * percentage / 100))
    return list(lines[:cut]), list(lines[cut:])


def token_blocks(
    lines: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    max_blocks: int | None = None,
    chunk_lines: int = 1000,
) -> list[list[int]]:
    """Tokenise ``lines``, concatenate the ids and cut them into blocks of ``block_size`` tokens.

    The remainder shorter than a block is dropped. With ``max_blocks`` only as many lines are tokenised as those
    blocks need, so a short run on a large corpus starts at once. Special tokens the tokenizer adds per line
    (BERT's ``[CLS]``/``[SEP]``) stay in the stream as separators.

    Examples::

        >>> blocks = token_blocks(read_text_lines("ptb.valid.txt.gz"), tokenizer, block_size=128)
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    blocks: list[list[int]] = []
    buffer: list[int] = []
    chunk: list[str] = []

    def flush() -> None:
        for ids in tokenizer(chunk)["input_ids"]:
            buffer.extend(ids)
        chunk.clear()
        whole = len(buffer) // block_size * block_size
        blocks.extend(buffer[i : i + block_size] for i in range(0, whole, block_size))
        del buffer[:whole]

    for line in lines:
        chunk.append(line)
        if len(chunk) == chunk_lines:
            flush()
            if max_blocks is not None and len(blocks) >= max_blocks:
                return blocks[:max_blocks]
    if chunk:
        flush()
    return blocks if max_blocks is None else blocks[:max_blocks]
