"""Sliding-window perplexity of a causal LM on a text file, and the ``hf-sparse-attn eval-ppl`` command.

The text is tokenised as one sequence and scored in windows of ``max_length`` tokens that start every ``stride``
tokens (the strided evaluation of the transformers perplexity guide). Each token is scored exactly once, in the
first window that reaches it, with the tokens before it in that window as context; with ``stride < max_length``
every scored token (after the first window) sees at least ``max_length - stride`` tokens of context. The first
token of a window that has nothing before it is not scored (only the very first token of the text, unless
``stride == max_length``).

    perplexity = exp( sum_t -log p(x_t | context_t) / number of scored tokens )

It works for plain and patched models alike: the model's ``logits`` go through ``log_softmax``, which leaves the
log-probabilities of our heads unchanged.

Examples::

    $ hf-sparse-attn eval-ppl --model gpt2-moss --file ../shared/data/wikitext-2/wiki.test.tokens.gz
    $ hf-sparse-attn eval-ppl --model ckpt --tokenizer gpt2 --file notes.txt --max-length 512 --stride 256
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

#: ``--dtype`` choices; "auto" keeps the checkpoint's dtype
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; files ending in ``.gz`` are decompressed."""
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window ``[begin, end)`` over a sequence of ``num_tokens`` tokens;
    the window scores the tokens ``[first_scored, end)``.

    Examples::

        >>> sliding_windows(10, max_length=4, stride=2)
        [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    """
    windows = []
    scored_until = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first = max(scored_until, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def _model_max_length(model: nn.Module) -> int | None:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text_path: str | os.PathLike,
    *,
    stride: int | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Sliding-window perplexity of the causal LM ``model`` on the text file ``text_path`` (plain or ``.gz``).

    Args:
        model (`nn.Module`): a transformers causal LM (plain or patched by ``hf_sparse_attn``).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text_path (`str | os.PathLike`): UTF-8 text, read whole and tokenised as one sequence.
        stride (`int`, *optional*): tokens between window starts, in ``[1, max_length]``; default ``max_length // 2``.
        max_length (`int`, *optional*): window length (>= 2); default the model's maximum number of positions.
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass.
        device (`str | torch.device`, *optional*): where to run; default the model's current device.
        progress (`bool`, *optional*, defaults to True): show a tqdm progress bar.

    Returns:
        `dict`: ``perplexity``, ``nll`` (mean negative log-likelihood per scored token, nats), ``num_tokens``
        (scored tokens), ``num_windows``, ``max_length``, ``stride``, ``seconds``, ``tokens_per_second``.

    Examples::

        >>> result = perplexity(model, tokenizer, "wiki.valid.tokens.gz", max_length=1024, stride=512)
        >>> round(result["perplexity"], 2)
    """
    if not (hasattr(model, "can_generate") and model.can_generate()):
        raise ValueError(
            f"model must be a causal language model (e.g. GPT2LMHeadModel); got {type(model).__name__}, whose "
            "perplexity is not defined left to right"
        )
    limit = _model_max_length(model)
    max_length = max_length or limit
    if not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
        raise ValueError(f"max_length must be an int in [2, {limit}] (the model's positions); got {max_length!r}")
    stride = stride or max(1, max_length // 2)
    if not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride must be an int in [1, max_length={max_length}]; got {stride!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    ids = torch.tensor(tokenizer(read_text(text_path), verbose=False)["input_ids"], dtype=torch.long)  # [N]
    windows = sliding_windows(len(ids), max_length, stride)
    if not windows:
        raise ValueError(f"{text_path}: the text has {len(ids)} token(s); at least 2 are needed")

    start = time.perf_counter()
    total_nll = 0.0
    num_scored = 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        width = max(end - begin for begin, end, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, L]; padding on the right
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width - 1, dtype=torch.bool)  # [B, L-1]: is target position j+1 scored
        for row, (begin, end, first) in enumerate(batch):
            input_ids[row, : end - begin] = ids[begin:end]
            attention_mask[row, : end - begin] = 1
            scored[row, first - begin - 1 : end - begin - 1] = True
        input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [B, L-1, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # the identity on our heads' log-probabilities
        nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
        total_nll += nll[scored].double().sum().item()
        num_scored += int(scored.sum())
    seconds = time.perf_counter() - start
    mean_nll = total_nll / num_scored
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "num_tokens": num_scored,
        "num_windows": len(windows),
        "max_length": max_length,
        "stride": stride,
        "seconds": seconds,
        "tokens_per_second": num_scored / seconds if seconds > 0 else float("inf"),
    }


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-sparse-attn eval-ppl``."""
    parser.add_argument("--model", required=True, help="checkpoint dir or Hub id (patched or plain causal LM)")
    parser.add_argument("--file", required=True, help="UTF-8 text file to score (.gz is decompressed)")
    parser.add_argument("--tokenizer", help="tokenizer dir or Hub id (default: the --model path)")
    parser.add_argument("--max-length", type=_positive_int, help="window length (default: the model's positions)")
    parser.add_argument("--stride", type=_positive_int, help="tokens between windows (default: max-length / 2)")
    parser.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward pass")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="weights dtype (default: as saved)")
    parser.add_argument("--output", help="also write the result as JSON to this file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Load ``--model`` with :func:`hf_sparse_attn.from_pretrained` and print its perplexity on ``--file``."""
    from hf_sparse_attn.patch import from_pretrained

    model = from_pretrained(args.model, dtype=DTYPES[args.dtype])
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = perplexity(
        model,
        tokenizer,
        args.file,
        stride=args.stride,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=device,
        progress=not args.no_progress,
    )
    result = {"model": args.model, "file": args.file, **result}
    print(
        f"{args.file}: perplexity {result['perplexity']:.3f} (mean NLL {result['nll']:.4f} nats) over "
        f"{result['num_tokens']} tokens in {result['num_windows']} windows of {result['max_length']} "
        f"(stride {result['stride']}); {result['seconds']:.1f} s, {result['tokens_per_second']:.0f} tokens/s"
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0
