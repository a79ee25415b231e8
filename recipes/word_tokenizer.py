"""Build a word-level tokenizer from pre-tokenised text files (PTB, WikiText) for models trained from scratch.

    python recipes/word_tokenizer.py ptb.train.txt --output_dir ptb-tokenizer
    python recipes/causal_lm.py --model_type gpt2 --config_overrides n_layer=2,n_embd=128,n_head=4 \
        --tokenizer_name ptb-tokenizer --train_file ptb.train.txt --do_train --do_eval ...

Whitespace-separated words, ``<eos>`` after each line, so the recipes' perplexities are per word (PTB: 10,000 words
incl. ``<eos>``, the usual setting).
"""

from __future__ import annotations

import argparse
import sys

import datasets

from hf_sparse_attn.training.data import file_builder, word_level_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="training text files (.txt, .tokens, .raw; .gz too)")
    parser.add_argument("--output_dir", required=True, help="where to save the tokenizer")
    parser.add_argument("--vocab_size", type=int, default=None, help="keep only the most frequent words")
    args = parser.parse_args(argv)
    if file_builder(args.files, "files")[0] != "text":
        raise ValueError(f"files: give text files (.txt, .tokens, .raw); got {', '.join(args.files)}")
    lines = datasets.load_dataset("text", data_files=args.files, split="train")["text"]
    tokenizer = word_level_tokenizer(lines, args.vocab_size)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved a {len(tokenizer)}-token word-level tokenizer to {args.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
