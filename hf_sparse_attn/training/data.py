"""Data for the fine-tuning recipes, loaded with 🤗 ``datasets``: GLUE (the Hub's ``nyu-mll/glue`` or the local TSV
release), any classification dataset (a Hub name, a local dataset folder, or csv / tsv / json files), and text corpora
(a Hub name or ``.txt`` / ``.tokens`` / ``.gz`` files) cut into blocks of tokens.

GLUE TSVs are read by the ``csv`` builder as plain tab-separated text *without* CSV quoting: several rows contain or
begin with ``"`` (RTE train, MRPC, STS-B), and a quoting reader silently merges or drops rows. MRPC files start with a
UTF-8 byte-order mark (``utf-8-sig``), CoLA train/dev have no header, and the test files have their own columns;
:data:`GLUE_TASKS` records each layout. Every field is read as a string (no ``NA``/``nan`` guessing), then labels
are converted and checked, with errors naming the file and line. The columns, label ids and features are those of
``nyu-mll/glue``, so a local run and a Hub run see the same data.

Text corpora are split into lines by the ``text`` builder (line breaks kept, as ``run_clm.py`` does), tokenised and
concatenated into blocks with ``Dataset.map(batched=True, num_proc=...)``, which ``datasets`` caches.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

#: the Hub dataset a ``--task_name`` loads without local files
GLUE_HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """Layout of one GLUE task in the TSV release and its labels.

    Args:
        directory: folder of the task in the GLUE release (``glue/<directory>/{train,dev,test}.tsv``).
        header: whether train.tsv / dev.tsv start with a header line (test.tsv always does).
        columns: names given to the fields of train.tsv / dev.tsv, in file order.
        test_columns: names given to the fields of test.tsv, in file order.
        text_columns: the text fields (named as in the Hub dataset).
        tsv_labels: label strings as written in the TSV, in label-id order; empty for regression.
        label_names: the Hub's names of the label ids (``id2label``).
    """

    directory: str
    header: bool
    columns: tuple[str, ...]
    test_columns: tuple[str, ...]
    text_columns: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    label_names: tuple[str, ...]

    @property
    def is_regression(self) -> bool:
        return not self.tsv_labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.tsv_labels)


_STSB = ("idx", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2")
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", False, ("source", "label", "author_label", "sentence"), ("idx", "sentence"),
                     ("sentence",), ("0", "1"), ("unacceptable", "acceptable")),
    "sst2": GlueTask("SST-2", True, ("sentence", "label"), ("idx", "sentence"), ("sentence",), ("0", "1"),
                     ("negative", "positive")),
    "mrpc": GlueTask("MRPC", True, ("label", "id1", "id2", "sentence1", "sentence2"),
                     ("idx", "id1", "id2", "sentence1", "sentence2"), ("sentence1", "sentence2"), ("0", "1"),
                     ("not_equivalent", "equivalent")),
    "stsb": GlueTask("STS-B", True, (*_STSB, "label"), _STSB, ("sentence1", "sentence2"), (), ()),
    "rte": GlueTask("RTE", True, ("idx", "sentence1", "sentence2", "label"), ("idx", "sentence1", "sentence2"),
                    ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("entailment", "not_entailment")),
}  # fmt: skip

#: split name -> file name (without ``.tsv``) in the GLUE release
GLUE_FILES = {"train": "train", "validation": "dev", "test": "test"}


def glue_task(name: str) -> GlueTask:
    """The :data:`GLUE_TASKS` entry for ``name``; ``ValueError`` listing the tasks otherwise."""
    if name not in GLUE_TASKS:
        raise ValueError(f"--task_name must be one of {', '.join(GLUE_TASKS)}; got {name!r}")
    return GLUE_TASKS[name]


def glue_features(task: GlueTask) -> datasets.Features:
    """The features of ``nyu-mll/glue`` for ``task``: text columns, ``label`` (``ClassLabel``, -1 on the test split;
    float32 for STS-B) and ``idx``."""
    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    text = {name: datasets.Value("string") for name in task.text_columns}
    return datasets.Features({**text, "label": label, "idx": datasets.Value("int32")})


def _label(value: str | None, task: GlueTask, where: str) -> int | float:
    if value is None:
        raise ValueError(f"{where}: the row has no label field")
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"{where}: label {value!r} is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"{where}: label {value!r} is not a finite number (regression labels must be finite)")
        return score
    if value not in task.tsv_labels:
        raise ValueError(f"{where}: label {value!r} is not one of {task.tsv_labels}")
    return task.tsv_labels.index(value)


def read_glue_tsv(
    path: str | os.PathLike,
    task: GlueTask,
    split: str = "train",
    *,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """One file of the GLUE TSV release as a ``datasets.Dataset`` with the Hub's columns and features.

    ``split`` picks the layout: ``"test"`` files have their own columns and no labels (``label`` is -1, as on the
    Hub). Raises ``ValueError`` naming the file and line for a row whose text or label field is empty or missing,
    an unknown label, or a regression label that is not a finite number (STS-B ``nan``).

    Examples::

        >>> dev = read_glue_tsv("glue/RTE/dev.tsv", GLUE_TASKS["rte"], "validation")
        >>> dev.num_rows, dev[0]["label"]
        (277, 1)
    """
    is_test = split == "test"
    columns = task.test_columns if is_test else task.columns
    header = is_test or task.header
    raw = datasets.load_dataset(
        "csv",
        data_files=os.fspath(path),
        split="train",
        delimiter="\t",
        quoting=csv.QUOTE_NONE,  # rows begin with or contain a literal "
        encoding="utf-8-sig",  # MRPC starts with a byte-order mark
        column_names=list(columns),
        header=0 if header else None,
        features=datasets.Features({name: datasets.Value("string") for name in columns}),
        keep_default_na=False,  # "NA", "nan", "null" stay text; labels are checked below
        na_values=[""],  # empty and missing fields become None (pandas fills a short row's missing fields with "")
        cache_dir=cache_dir,
    )
    first_line = 2 if header else 1

    def convert(row: dict[str, str | None], index: int) -> dict[str, Any]:
        where = f"{path}:{index + first_line}"
        needed = (*task.text_columns, *(() if is_test else ("label",)))
        missing = [name for name in needed if row[name] is None]
        if missing:
            raise ValueError(
                f"{where}: field {missing[0]!r} is empty or missing; expected {len(columns)} tab-separated fields "
                f"({', '.join(columns)})"
            )
        label = -1 if is_test else _label(row["label"], task, where)
        return {**{name: row[name] for name in task.text_columns}, "label": label, "idx": index}

    return raw.map(
        convert,
        with_indices=True,
        remove_columns=list(columns),
        features=glue_features(task),
        num_proc=num_proc,
        desc=f"Reading {Path(path).name}",
    )


def load_glue_folder(
    task_name: str,
    data_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "validation"),
    *,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """``splits`` of a GLUE task from the TSV release: ``data_dir`` is the release folder (holding ``RTE/``,
    ``SST-2/``, ...) or the task's own folder (holding ``train.tsv``, ``dev.tsv``, ``test.tsv``).

    Examples::

        >>> load_glue_folder("rte", "glue")["validation"].num_rows
        277
    """
    task = glue_task(task_name)
    folder = Path(data_dir)
    if not (folder / "train.tsv").is_file() and (folder / task.directory).is_dir():
        folder = folder / task.directory
    files = {split: folder / f"{GLUE_FILES[split]}.tsv" for split in splits}
    for path in files.values():
        if not path.is_file():
            raise ValueError(f"--data_dir: {path} not found; give the GLUE folder (holding {task.directory}/) or the "
                             "task's folder")  # fmt: skip
    return datasets.DatasetDict(
        {split: read_glue_tsv(p, task, split, cache_dir=cache_dir, num_proc=num_proc) for split, p in files.items()}
    )


#: file extension -> ``datasets`` builder (``.gz`` files are read through by their inner extension)
BUILDERS = {"txt": "text", "tokens": "text", "raw": "text", "csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}


def file_builder(paths: Sequence[str | os.PathLike], option: str) -> tuple[str, dict[str, Any]]:
    """The ``datasets`` builder and its options for data files: text for ``.txt`` / ``.tokens`` / ``.raw``, csv for
    ``.csv`` and ``.tsv`` (tab-separated), json for ``.json`` / ``.jsonl``; a trailing ``.gz`` is decompressed.
    ``option`` names the command-line option in errors."""
    extensions = set()
    for path in paths:
        name = os.fspath(path).removesuffix(".gz")
        extension = name.rsplit(".", 1)[-1].lower() if "." in Path(name).name else ""
        if extension not in BUILDERS:
            raise ValueError(
                f"{option}: {path} has an unsupported extension; use one of "
                f"{', '.join('.' + e for e in BUILDERS)} (optionally .gz)"
            )
        extensions.add(extension)
    builders = {BUILDERS[e] for e in extensions}
    if len(builders) > 1 or extensions >= {"csv", "tsv"}:
        raise ValueError(f"{option}: all files must have the same format; got {', '.join(sorted(extensions))}")
    builder = builders.pop()
    return builder, ({"delimiter": "\t"} if extensions == {"tsv"} else {})


def load_text(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: Sequence[str] | None = None,
    validation_file: Sequence[str] | None = None,
    validation_split_percentage: int = 5,
    keep_linebreaks: bool = True,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> datasets.DatasetDict:
    """``train`` and ``validation`` text for language modelling, from ``dataset_name`` (a Hub dataset, or a local
    dataset folder: data files, optionally with a README.md that declares configurations as Hub repositories do) or
    from files.

    Without a validation split (no ``validation_file``, or a Hub dataset without one), the last
    ``validation_split_percentage`` % of the training rows is held out: ``split="train[:95%]"`` and
    ``"train[95%:]"``. Text files give one row per line.

    Examples::

        >>> load_text(dataset_name="wikitext", dataset_config_name="wikitext-2-raw-v1")
        >>> load_text(train_file=["ptb.train.txt.gz"], validation_file=["ptb.valid.txt.gz"])
    """
    if not 0 < validation_split_percentage < 100:
        raise ValueError(f"--validation_split_percentage must be an int in [1, 99]; got {validation_split_percentage}")
    hub = {"cache_dir": cache_dir, "token": token}
    keep = 100 - validation_split_percentage
    if dataset_name is not None:
        raw = datasets.load_dataset(dataset_name, dataset_config_name, **hub)
        if "validation" in raw:
            return datasets.DatasetDict({"train": raw["train"], "validation": raw["validation"]})
        load = {"path": dataset_name, "name": dataset_config_name, **hub}
    elif train_file:
        files = {"train": list(train_file), **({"validation": list(validation_file)} if validation_file else {})}
        builder, options = file_builder([p for group in files.values() for p in group], "--train_file")
        if builder == "text":
            options["keep_linebreaks"] = keep_linebreaks
        load = {"path": builder, "data_files": files, **options, **hub}
        if validation_file:
            return datasets.load_dataset(**load)
    else:
        raise ValueError("give --dataset_name (a Hub dataset or a local dataset folder) or --train_file")
    return datasets.DatasetDict(
        {
            "train": datasets.load_dataset(**load, split=f"train[:{keep}%]"),
            "validation": datasets.load_dataset(**load, split=f"train[{keep}%:]"),
        }
    )


def group_texts(
    raw: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    causal: bool,
    num_proc: int | None = None,
) -> datasets.DatasetDict:
    """Tokenise the ``text`` column (or the first column), concatenate the token ids and cut them into blocks of
    ``block_size`` tokens, as ``run_clm.py`` / ``run_mlm.py`` do: each ``map`` batch of 1,000 rows drops its
    remainder shorter than a block. Special tokens the tokenizer adds per row (BERT's ``[CLS]``/``[SEP]``, the
    word-level tokenizer's ``<eos>``) stay in the stream as separators. For a causal LM the blocks are also the
    ``labels`` (the model shifts them); a masked LM gets its labels from the masking collator.

    Examples::

        >>> blocks = group_texts(load_text(train_file=["wiki.train.tokens"]), tokenizer, 128, causal=True)
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"--block_size must be a positive int; got {block_size!r}")
    names = next(iter(raw.values())).column_names
    column = "text" if "text" in names else names[0]

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch[column])

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = {key: list(chain.from_iterable(values)) for key, values in batch.items()}
        total = len(joined["input_ids"]) // block_size * block_size
        blocks = {key: [ids[i : i + block_size] for i in range(0, total, block_size)] for key, ids in joined.items()}
        if causal:
            blocks["labels"] = [list(ids) for ids in blocks["input_ids"]]
        return blocks

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=names, desc="Tokenizing")
    return tokenized.map(group, batched=True, num_proc=num_proc, desc=f"Grouping into blocks of {block_size}")


@dataclass(frozen=True)
class ClassificationData:
    """What the classification recipe needs to know about its data.

    Args:
        raw: the splits, with a ``label`` column of ids (floats for regression) and the text columns.
        text_columns: one or two text columns, fed to the tokenizer as a single text or a pair.
        label_names: the name of each label id; empty for regression.
        metric_config: configuration of the packaged GLUE metric: the task, or for other data ``sst2``
            (accuracy) for classification and ``stsb`` (Pearson and Spearman) for regression.
        name: the task or dataset name, used in ``predict_results_<name>.txt``.
    """

    raw: datasets.DatasetDict
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_config: str
    name: str

    @property
    def is_regression(self) -> bool:
        return not self.label_names


def load_classification(
    *,
    task_name: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | None = None,
    files: dict[str, str] | None = None,
    splits: Sequence[str] = ("train", "validation"),
    cache_dir: str | None = None,
    token: str | bool | None = None,
    num_proc: int | None = None,
) -> ClassificationData:
    """The ``splits`` of a sentence (pair) classification or regression dataset, from the first source given:

    1. ``data_dir``: the GLUE TSV release folder (or a task's folder); needs ``task_name``.
    2. ``files`` (``{"train": path, "validation": path, "test": path}``): with ``task_name``, ``.tsv`` files are read
       in the GLUE release layout; otherwise csv / tsv / json(l) files with a header, a ``label`` column and one or
       two text columns (``sentence1`` and ``sentence2`` when present), as ``run_glue.py`` reads them.
    3. ``dataset_name`` (a Hub dataset or a local dataset folder) with ``dataset_config_name`` (default: the task).
    4. ``task_name`` alone: the Hub's ``nyu-mll/glue``.

    Regression labels must be finite numbers and classification labels known ones; errors name the file and line
    (local files) or the split and row.

    Examples::

        >>> data = load_classification(task_name="sst2")  # nyu-mll/glue from the Hub
        >>> data = load_classification(task_name="rte", data_dir="glue")  # the TSV release
        >>> data = load_classification(files={"train": "train.csv", "validation": "dev.csv"})
    """
    task = glue_task(task_name) if task_name is not None else None
    files = {split: path for split, path in (files or {}).items() if path and split in splits}
    hub = {"cache_dir": cache_dir, "token": token}
    if data_dir is not None:
        if task is None:
            raise ValueError("--data_dir (the GLUE TSV release) needs --task_name")
        raw = load_glue_folder(task_name, data_dir, splits, cache_dir=cache_dir, num_proc=num_proc)
        where, name = None, task_name
    elif files:
        missing = [split for split in splits if split not in files]
        if missing:
            option = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}[missing[0]]
            raise ValueError(
                f"{option} is needed with local files for this run (--do_train / --do_eval / --do_predict)"
            )
        if task is not None and all(os.fspath(p).endswith(".tsv") for p in files.values()):
            raw = datasets.DatasetDict(
                {s: read_glue_tsv(p, task, s, cache_dir=cache_dir, num_proc=num_proc) for s, p in files.items()}
            )
        else:
            builder, options = file_builder(list(files.values()), "--train_file")
            if builder == "text":
                raise ValueError("--train_file: classification needs csv, tsv or json files with a label column")
            raw = datasets.load_dataset(builder, data_files=files, **options, **hub)
        first_row_line = {split: 1 if file_builder([p], "")[0] == "json" else 2 for split, p in files.items()}
        name = Path(files.get("train") or next(iter(files.values()))).stem

        def where(split: str, index: int) -> str:
            return f"{files[split]}:{index + first_row_line[split]}"

    elif dataset_name is not None or task is not None:
        dataset_name = dataset_name or GLUE_HUB_NAME
        loaded = datasets.load_dataset(dataset_name, dataset_config_name or task_name, **hub)
        missing = [split for split in splits if split not in loaded]
        if missing:
            raise ValueError(f"--dataset_name {dataset_name}: no {missing[0]!r} split (it has {', '.join(loaded)})")
        raw = datasets.DatasetDict({split: loaded[split] for split in splits})
        name = task_name or dataset_name.rstrip("/").rsplit("/", 1)[-1]

        def where(split: str, index: int) -> str:
            return f"{dataset_name} split {split!r} row {index}"

    else:
        raise ValueError("give --task_name, --dataset_name, --data_dir or --train_file / --validation_file")

    if task is not None:
        if where is not None:
            _check_labels(raw, task.is_regression, task.num_labels, where)
        return ClassificationData(raw, task.text_columns, task.label_names, task_name, task_name)
    return _generic_classification(raw, where, name)


def _generic_classification(raw: datasets.DatasetDict, where, name: str) -> ClassificationData:
    """Label ids, text columns and metric for a dataset that is not a GLUE task (``run_glue.py``'s rules)."""
    first = next(iter(raw.values()))
    if "label" not in first.column_names:
        raise ValueError(f"the data needs a 'label' column; it has {', '.join(first.column_names)}")
    labelled = [split for split, dataset in raw.items() if "label" in dataset.column_names]
    if labelled != list(raw) and labelled + ["test"] != list(raw):
        raise ValueError("every split but the test split needs a 'label' column")
    feature = first.features["label"]
    is_regression = isinstance(feature, datasets.Value) and feature.dtype.startswith("float")
    if isinstance(feature, datasets.ClassLabel):
        label_names = tuple(feature.names)
    elif is_regression:
        label_names = ()
    else:  # strings or ints: sorted distinct labels of the first split become ids 0..K-1
        label_names = tuple(str(v) for v in sorted(set(first["label"])))
        ids = {value: i for i, value in enumerate(sorted(set(first["label"])))}
        for split in labelled:
            unknown = [i for i, v in enumerate(raw[split]["label"]) if v not in ids]
            if unknown:
                value = raw[split][unknown[0]]["label"]
                raise ValueError(
                    f"{where(split, unknown[0])}: label {value!r} does not occur in the training data "
                    f"({', '.join(label_names)})"
                )
        for split in labelled:
            features = datasets.Features({**raw[split].features, "label": datasets.Value("int64")})
            raw[split] = raw[split].map(lambda row: {"label": ids[row["label"]]}, features=features)
    if is_regression:
        _check_labels(raw, True, 1, where)
    others = [c for c in first.column_names if c not in ("label", "idx")]
    text_columns = ("sentence1", "sentence2") if {"sentence1", "sentence2"} <= set(others) else tuple(others[:2])
    if not text_columns:
        raise ValueError("the data needs one or two text columns besides 'label'")
    return ClassificationData(raw, text_columns, label_names, "stsb" if is_regression else "sst2", name)


def _check_labels(raw: datasets.DatasetDict, is_regression: bool, num_labels: int, where) -> None:
    """``ValueError`` naming the row of the first label that is not finite (regression) or not an id in
    ``[0, num_labels)``; ``-1`` (an unlabelled row, as on the Hub's test splits) is allowed in ``test``."""
    for split, dataset in raw.items():
        if "label" not in dataset.column_names:
            continue
        lowest = -1 if split == "test" else 0
        for index, value in enumerate(dataset["label"]):
            if is_regression:
                bad = value is None or not (math.isfinite(value) or split == "test")
            else:
                bad = value is None or not lowest <= value < num_labels
            if bad:
                kind = "a finite number" if is_regression else f"a label id in [0, {num_labels})"
                shown = "is missing or NaN, not" if value is None else f"{value!r} is not"  # NaN is read as None
                raise ValueError(f"{where(split, index)}: label {shown} {kind}")


#: special tokens of :func:`word_level_tokenizer`
WORD_SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "eos_token": "<eos>", "mask_token": "<mask>"}


def word_level_tokenizer(lines: Iterable[str], vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for pre-tokenised corpora (PTB, WikiText): whitespace-separated words, the
    ``vocab_size`` most frequent ones (all by default, special tokens included), the rest ``<unk>``, and ``<eos>``
    appended to every line -- the usual word-level language-modelling convention, so perplexities are per word.

    Examples::

        >>> lines = datasets.load_dataset("text", data_files="ptb.train.txt.gz", split="train")["text"]
        >>> tokenizer = word_level_tokenizer(lines)
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
