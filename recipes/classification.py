"""Fine-tune a (patched) BERT / RoBERTa / GPT-2 on a GLUE task (CoLA, SST-2, MRPC, STS-B regression, RTE) or on
your own sentence (pair) classification / regression data. The options are those of transformers' ``run_glue.py``
plus the patch options.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/classification.py \
        --model_name_or_path roberta-base --task_name sst2 --dataset_name nyu-mll/glue \
        --sparsity 0.5 --sparsity_warmup_steps 500 --do_train --do_eval --output_dir out
    python recipes/classification.py ... --task_name rte --data_dir glue  # the GLUE TSV release (RTE/train.tsv ...)
    python recipes/classification.py ... --train_file train.csv --validation_file dev.csv  # your own data
    python recipes/classification.py args.json  # the same options in a JSON file

Data (first given): ``--data_dir``, ``--train_file`` / ``--validation_file`` / ``--test_file``, ``--dataset_name``, or
``--task_name`` alone (the Hub's ``nyu-mll/glue``); see :func:`hf_sparse_attn.training.data.load_classification`.
Metric: the task's GLUE metric from the packaged ``evaluate`` module. ``--do_predict`` writes
``predict_results_<task>.txt`` for the test split, as ``run_glue.py`` does. All options:
``python recipes/classification.py --help``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_sparse_attn.training.data import GLUE_TASKS, ClassificationData, load_classification
from hf_sparse_attn.training.metrics import glue_compute_metrics
from hf_sparse_attn.training.recipe import (
    ModelArguments,
    PatchArguments,
    SampleArguments,
    add_sparsity_callbacks,
    check_stages,
    first,
    load_model,
    load_tokenizer,
    parse_arguments,
    prepare_model,
    setup_logging,
    train_and_evaluate,
)


@dataclass
class GlueArguments:
    """The data: a GLUE task, a Hub dataset, the GLUE TSV release, or local files (``run_glue.py``'s names)."""

    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task", "choices": tuple(GLUE_TASKS), "aliases": ["--task"]}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset or local dataset folder (default with --task_name: nyu-mll/glue)"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "its configuration (default: --task_name)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "the GLUE TSV release folder (holding SST-2/, RTE/, ...) or one task's folder"}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "csv / tsv / json file with a label column and one or two text columns"}
    )
    validation_file: str | None = field(default=None, metadata={"help": "evaluation file, same format"})
    test_file: str | None = field(default=None, metadata={"help": "prediction file (--do_predict), same format"})
    max_seq_length: int = field(default=128, metadata={"help": "truncate sentence (pairs) to this many tokens"})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes for reading and tokenising (datasets.map num_proc)"}
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, GlueArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parse_arguments(parser, argv)
    check_stages(training_args)
    setup_logging(training_args)
    set_seed(training_args.seed)

    stages = {"train": training_args.do_train, "validation": training_args.do_eval, "test": training_args.do_predict}
    with training_args.main_process_first(desc="loading the data"):  # the others read datasets' cache
        data = load_classification(
            task_name=data_args.task_name,
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            data_dir=data_args.data_dir,
            files={"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file},
            splits=[split for split, wanted in stages.items() if wanted],
            cache_dir=model_args.cache_dir,
            token=model_args.token,
            num_proc=data_args.preprocessing_num_workers,
        )

    tokenizer = load_tokenizer(model_args)
    names = data.label_names
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} if names else {}
    model = load_model(
        AutoModelForSequenceClassification,
        model_args,
        tokenizer,
        num_labels=1 if data.is_regression else len(names),
        problem_type="regression" if data.is_regression else "single_label_classification",
        **labels,
    )
    model = prepare_model(model, patch_args)

    limits = {"train": samples.max_train_samples, "validation": samples.max_eval_samples}
    limits["test"] = samples.max_predict_samples
    raw = data.raw
    for split in raw:
        raw[split] = first(raw[split], limits[split])

    def tokenize(batch):
        texts = [batch[column] for column in data.text_columns]
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers, desc="Tokenizing")
    keep = (*tokenizer.model_input_names, "label")
    tokenized = tokenized.remove_columns([c for c in tokenized[next(iter(tokenized))].column_names if c not in keep])

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue_compute_metrics(data.metric_config, data.is_regression),
    )
    add_sparsity_callbacks(trainer, patch_args, tokenized.get("validation", tokenized.get("train")))
    metrics = train_and_evaluate(trainer)
    if training_args.do_predict:
        predict(trainer, tokenized["test"], data)
    return metrics


def predict(trainer: Trainer, test, data: ClassificationData) -> str:
    """Write ``predict_results_<name>.txt`` in ``--output_dir`` (``index<TAB>prediction`` rows: the label name, or
    the score with 3 decimals for regression), as ``run_glue.py`` does; returns its path."""
    unlabelled = test.remove_columns([c for c in test.column_names if c == "label"])
    logits = trainer.predict(unlabelled, metric_key_prefix="predict").predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = np.squeeze(logits, axis=-1) if data.is_regression else np.argmax(logits, axis=-1)
    path = os.path.join(trainer.args.output_dir, f"predict_results_{data.name}.txt")
    if trainer.is_world_process_zero():
        with open(path, "w") as f:
            f.write("index\tprediction\n")
            for index, item in enumerate(predictions):
                f.write(f"{index}\t{item:3.3f}\n" if data.is_regression else f"{index}\t{data.label_names[item]}\n")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
