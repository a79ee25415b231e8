"""Fine-tune (or train from scratch) a patched causal LM -- GPT-2 with any head -- on text files; reports perplexity.

    accelerate launch recipes/causal_lm.py --model_name_or_path gpt2 --train_file wiki.train.tokens \
        --head moss --num_mixtures 4 --sparsity 0.3 --output_dir out-lm

Text files (.txt, .tokens, or .gz) are tokenised, concatenated and cut into ``--block_size`` blocks. The new heads
return log-probabilities, so ``eval_loss`` is the exact per-token NLL and ``eval_perplexity`` = exp(eval_loss).
All options: ``python recipes/causal_lm.py --help``.
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

from hf_sparse_attn.recipe_setup import (
    ModelArguments,
    PatchArguments,
    SampleArguments,
    TextArguments,
    add_sparsity_callbacks,
    load_model,
    load_tokenizer,
    prepare_model,
    setup_logging,
    text_datasets,
    train_and_evaluate,
)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, TextArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parser.parse_args_into_dataclasses(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = load_model(AutoModelForCausalLM, model_args, tokenizer)
    # transformers 5.23 infers the loss type from the class name and does not recognise GPT2LMHeadModel; the Trainer
    # then counts the unshifted labels as loss tokens and scales every loss (and perplexity) by (T - 1) / T
    model.loss_type = "ForCausalLM"
    model = prepare_model(model, patch_args)
    train, evaluation = text_datasets(data_args, samples, tokenizer, causal=True)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    add_sparsity_callbacks(trainer, patch_args, evaluation)
    return train_and_evaluate(trainer, perplexity=True)


if __name__ == "__main__":
    main(sys.argv[1:])
