"""Fine-tune (or train from scratch) a patched BERT / RoBERTa masked LM, any head, on text files.

    accelerate launch recipes/masked_lm.py --model_name_or_path roberta-base --train_file wiki.train.tokens \
        --sparsity 0.5 --head plif --output_dir out-mlm

Text files (.txt, .tokens, or .gz) are tokenised, concatenated and cut into ``--block_size`` blocks;
``DataCollatorForLanguageModeling`` masks ``--mlm_probability`` of the tokens. Reports ``eval_loss`` (NLL of the
masked tokens) and ``eval_perplexity`` = exp(eval_loss). All options: ``python recipes/masked_lm.py --help``.
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


@dataclass
class MaskingArguments:
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of tokens to mask"})


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser(
        (ModelArguments, TextArguments, MaskingArguments, SampleArguments, PatchArguments, TrainingArguments)
    )
    model_args, data_args, masking, samples, patch_args, training_args = parser.parse_args_into_dataclasses(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args)
    model = prepare_model(load_model(AutoModelForMaskedLM, model_args, tokenizer), patch_args)
    train, evaluation = text_datasets(data_args, samples, tokenizer, causal=False)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=masking.mlm_probability),
    )
    add_sparsity_callbacks(trainer, patch_args, evaluation)
    return train_and_evaluate(trainer, perplexity=True)


if __name__ == "__main__":
    main(sys.argv[1:])
