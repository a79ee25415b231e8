"""Fine-tune a (patched) BERT / RoBERTa / GPT-2 on a GLUE task: CoLA, SST-2, MRPC, STS-B (regression) or RTE.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/classification.py \
        --model_name_or_path roberta-base --task sst2 --sparsity 0.5 --sparsity_warmup_steps 500 --output_dir out

Data: ``--data_dir`` (the GLUE folder holding SST-2/, RTE/, ... or one task's folder) or, without it, the Hub's
``nyu-mll/glue``. Metric: the task's GLUE metric. All options: ``python recipes/classification.py --help``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_sparse_attn.recipe_data import GLUE_TASKS, glue_metrics, glue_task, load_glue
from hf_sparse_attn.recipe_setup import (
    ModelArguments,
    PatchArguments,
    SampleArguments,
    add_sparsity_callbacks,
    load_model,
    load_tokenizer,
    prepare_model,
    setup_logging,
    train_and_evaluate,
)


@dataclass
class GlueArguments:
    task: str = field(metadata={"help": "GLUE task", "choices": tuple(GLUE_TASKS)})
    data_dir: str | None = field(
        default=None, metadata={"help": "GLUE folder or task folder with train.tsv / dev.tsv (default: the Hub)"}
    )
    max_seq_length: int = field(default=128, metadata={"help": "truncate sentence (pairs) to this many tokens"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, GlueArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parser.parse_args_into_dataclasses(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    task = glue_task(data_args.task)

    tokenizer = load_tokenizer(model_args)
    labels = {"id2label": dict(enumerate(task.label_names)), "label2id": {n: i for i, n in enumerate(task.label_names)}}
    model = load_model(
        AutoModelForSequenceClassification,
        model_args,
        tokenizer,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        **(labels if task.label_names else {}),
    )
    model = prepare_model(model, patch_args)

    raw = load_glue(data_args.task, data_args.data_dir)
    limits = {"train": samples.max_train_samples, "validation": samples.max_eval_samples}
    for split, limit in limits.items():
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, raw[split].num_rows)))

    def tokenize(batch):
        texts = [batch[column] for column in task.columns]
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    data = raw.map(tokenize, batched=True, remove_columns=list(task.columns))
    data = data.remove_columns(
        [c for c in data["train"].column_names if c not in (*tokenizer.model_input_names, "label")]
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=glue_metrics(data_args.task),
    )
    add_sparsity_callbacks(trainer, patch_args, data["validation"])
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main(sys.argv[1:])
