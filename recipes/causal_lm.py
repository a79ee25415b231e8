"""Fine-tune (or train from scratch) a patched causal LM -- GPT-2 with any head -- on a Hub dataset or text files;
reports perplexity. The options are those of transformers' ``run_clm.py`` plus the patch options.

    accelerate launch recipes/causal_lm.py --model_name_or_path gpt2 \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 \
        --head moss --num_mixtures 4 --sparsity 0.3 --do_train --do_eval --output_dir out-lm
    python recipes/causal_lm.py ... --train_file wiki.train.tokens --validation_file wiki.valid.tokens  # local files
    python recipes/causal_lm.py args.json  # the same options in a JSON file

The text (one row per line of .txt / .tokens / .gz files) is tokenised, concatenated and cut into ``--block_size``
blocks. ``eval_perplexity`` is exp of the mean NLL over every predicted token of the evaluation blocks, computed by
the packaged ``evaluate`` perplexity module. All options: ``python recipes/causal_lm.py --help``.
"""

from __future__ import annotations

import sys

from transformers import (
    AutoModelForCausalLM,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, TextArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parse_arguments(parser, argv)
    check_stages(training_args, predict=False)
    setup_logging(training_args)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = load_model(AutoModelForCausalLM, model_args, tokenizer)
    # transformers 5.23 infers the loss type from the class name and does not recognise GPT2LMHeadModel; the Trainer
    # then counts the unshifted labels as loss tokens and scales every loss (and perplexity) by (T - 1) / T
    model.loss_type = "ForCausalLM"
    model = prepare_model(model, patch_args)
    with training_args.main_process_first(desc="tokenizing and grouping"):  # the others read datasets' cache
        train, evaluation = text_datasets(data_args, samples, tokenizer, model_args, causal=True)
    preprocess, compute_metrics = perplexity_compute_metrics(causal=True)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train if training_args.do_train else None,
        eval_dataset=evaluation if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    add_sparsity_callbacks(trainer, patch_args, evaluation)
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main(sys.argv[1:])
