"""Fine-tune (or train from scratch) a patched BERT / RoBERTa masked LM, any head, on a Hub dataset or text files.
The options are those of transformers' ``run_mlm.py`` plus the patch options.

    accelerate launch recipes/masked_lm.py --model_name_or_path roberta-base \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --sparsity 0.5 --head plif --do_train --do_eval --output_dir out-mlm
    python recipes/masked_lm.py ... --train_file wiki.train.tokens --validation_file wiki.valid.tokens  # local files

The text is tokenised, concatenated and cut into ``--max_seq_length`` (alias ``--block_size``) blocks;
``DataCollatorForLanguageModeling`` masks ``--mlm_probability`` of the tokens. Reports ``eval_loss`` and
``eval_perplexity``: exp of the mean NLL over every masked token of the evaluation set (the packaged ``evaluate``
perplexity module). All options: ``python recipes/masked_lm.py --help``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from transformers import (
    AutoModelForMaskedLM,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_sparse_attn.training.metrics import perplexity_compute_metrics
from hf_sparse_attn.training.recipe import (
    ModelArguments,
    PatchArguments,
    SampleArguments,
    TextArguments,
    add_sparsity_callbacks,
    check_stages,
    load_model,
    load_tokenizer,
    parse_arguments,
    prepare_model,
    setup_logging,
    text_datasets,
    train_and_evaluate,
)


@dataclass
class MaskingArguments:
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens to mask"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser(
        (ModelArguments, TextArguments, MaskingArguments, SampleArguments, PatchArguments, TrainingArguments)
    )
    model_args, data_args, masking, samples, patch_args, training_args = parse_arguments(parser, argv)
    check_stages(training_args, predict=False)
    setup_logging(training_args)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = prepare_model(load_model(AutoModelForMaskedLM, model_args, tokenizer), patch_args)
    with training_args.main_process_first(desc="tokenizing and grouping"):  # the others read datasets' cache
        train, evaluation = text_datasets(data_args, samples, tokenizer, model_args, causal=False)
    preprocess, compute_metrics = perplexity_compute_metrics(causal=False)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train if training_args.do_train else None,
        eval_dataset=evaluation if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=masking.mlm_probability),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    add_sparsity_callbacks(trainer, patch_args, evaluation)
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main(sys.argv[1:])
