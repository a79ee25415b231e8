"""``hf-sparse-attn eval-ppl``: sliding-window perplexity of a (patched) causal LM on a text file or a Hub dataset.

The model is loaded with :func:`hf_sparse_attn.from_pretrained` and scored by
:func:`hf_sparse_attn.training.perplexity.perplexity`; torch and transformers are imported inside :func:`run`, so
``hf-sparse-attn eval-ppl --help`` is fast.

Examples::

    $ hf-sparse-attn eval-ppl --model gpt2-moss --dataset-name wikitext --dataset-config-name wikitext-2-raw-v1
    $ hf-sparse-attn eval-ppl --model gpt2-moss --file wiki.test.tokens.gz
    $ hf-sparse-attn eval-ppl --model ckpt --tokenizer gpt2 --file notes.txt --max-length 512 --stride 256
"""

from __future__ import annotations

import argparse
import json

#: ``--dtype`` choices (names of torch dtypes); "auto" keeps the checkpoint's dtype
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-sparse-attn eval-ppl``."""
    parser.add_argument("--model", required=True, help="checkpoint dir or Hub id (patched or plain causal LM)")
    parser.add_argument("--file", help="UTF-8 text file to score (.gz is decompressed)")
    parser.add_argument("--dataset-name", help="instead of --file: a Hub dataset (e.g. wikitext) or dataset folder")
    parser.add_argument("--dataset-config-name", help="its configuration (e.g. wikitext-2-raw-v1)")
    parser.add_argument("--split", default="test", help="the dataset split to score (default: test)")
    parser.add_argument("--text-column", default="text", help="the dataset column holding the text (default: text)")
    parser.add_argument("--tokenizer", help="tokenizer dir or Hub id (default: the --model path)")
    parser.add_argument("--max-length", type=_positive_int, help="window length (default: the model's positions)")
    parser.add_argument("--stride", type=_positive_int, help="tokens between windows (default: max-length / 2)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: as saved)")
    parser.add_argument("--output", help="also write the result as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Load ``--model`` with :func:`hf_sparse_attn.from_pretrained` and print its perplexity on ``--file`` or the
    ``--dataset-name`` split."""
    import torch
    from transformers import AutoTokenizer

    from hf_sparse_attn.patch import from_pretrained
    from hf_sparse_attn.training.perplexity import load_eval_text, perplexity

    text = load_eval_text(
        args.file,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        split=args.split,
        text_column=args.text_column,
    )
    model = from_pretrained(args.model, dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = perplexity(
        model,
        tokenizer,
        text=text,
        stride=args.stride,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    source = args.file or " ".join(filter(None, (args.dataset_name, args.dataset_config_name, args.split)))
    result = {"model": args.model, "file": args.file, "dataset_name": args.dataset_name, **result}
    print(
        f"{source}: perplexity {result['perplexity']:.3f} (mean NLL {result['nll']:.4f} nats) over "
        f"{result['num_tokens']} tokens in {result['num_windows']} windows of {result['max_length']} "
        f"(stride {result['stride']}); {result['seconds']:.1f} s, {result['tokens_per_second']:.0f} tokens/s"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0
