"""Sliding-window perplexity of a causal LM on a text file or a Hub dataset (``hf-sparse-attn eval-ppl`` is
:mod:`hf_sparse_attn.commands.eval_ppl`).

The text is tokenised as one sequence and scored in windows of ``max_length`` tokens that start every ``stride``
tokens (the strided evaluation of the transformers perplexity guide). Each token is scored exactly once, in the
first window that reaches it, with the tokens before it in that window as context; with ``stride < max_length``
every scored token (after the first window) sees at least ``max_length - stride`` tokens of context. The first
token of a window that has nothing before it is not scored (only the very first token of the text, unless
``stride == max_length``).

    perplexity = exp( sum_t -log p(x_t | context_t) / number of scored tokens )

It works for plain and patched models alike: the model's ``logits`` go through ``log_softmax``, which leaves the
log-probabilities of our heads unchanged. The text is read with ``datasets`` (a file as one document, or a Hub
dataset's split joined with blank lines as in the transformers perplexity guide), and the score is computed by the
packaged ``evaluate`` perplexity module (:mod:`hf_sparse_attn.training.metrics`).

torch, transformers and datasets are imported inside the functions.

Examples::

    >>> from hf_sparse_attn.training.perplexity import perplexity
    >>> perplexity(model, tokenizer, "wiki.valid.tokens.gz", max_length=1024, stride=512)["perplexity"]
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def load_eval_text(
    file: str | os.PathLike | None = None,
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "test",
    text_column: str = "text",
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> str:
    """The text to score: the whole of ``file`` (UTF-8; ``.gz`` is decompressed), or the ``text_column`` of a Hub
    dataset's ``split`` (or a local dataset folder) joined with blank lines, as the transformers perplexity guide does
    (``"\\n\\n".join(test["text"])``). Exactly one of ``file`` and ``dataset_name``.

    Examples::

        >>> text = load_eval_text(dataset_name="wikitext", dataset_config_name="wikitext-2-raw-v1")
        >>> text = load_eval_text("wiki.test.tokens.gz")
    """
    import datasets

    if (file is None) == (dataset_name is None):
        raise ValueError("give exactly one of --file (a text file) and --dataset-name (a Hub dataset or folder)")
    if file is not None:
        if not os.path.isfile(file):
            raise ValueError(f"--file: {file} is not a file")
        loaded = datasets.load_dataset("text", data_files=os.fspath(file), sample_by="document", split="train")
        return "".join(loaded["text"])
    loaded = datasets.load_dataset(dataset_name, dataset_config_name, split=split, cache_dir=cache_dir, token=token)
    if text_column not in loaded.column_names:
        raise ValueError(
            f"--text-column: {dataset_name} has no column {text_column!r} ({', '.join(loaded.column_names)})"
        )
    return "\n\n".join(loaded[text_column])


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


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text_path: str | os.PathLike | None = None,
    *,
    text: str | None = None,
    stride: int | None = None,
    max_length: int | None = None,
    batch_size: int = 1,
    device: str | Any | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Sliding-window perplexity of the causal LM ``model`` on the text file ``text_path`` (plain or ``.gz``) or on
    ``text``.

    Args:
        model (`nn.Module`): a transformers causal LM (plain or patched by ``hf_sparse_attn``).
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        text_path (`str | os.PathLike`, *optional*): UTF-8 text file, read whole and tokenised as one sequence.
        text (`str`, *optional*): the text itself (e.g. from :func:`load_eval_text`), instead of ``text_path``.
        stride (`int`, *optional*): tokens between window starts, in ``[1, max_length]``; default ``max_length // 2``.
        max_length (`int`, *optional*): window length (>= 2); default the model's maximum number of positions.
        batch_size (`int`, *optional*, defaults to 1): windows per forward pass.
        device (`str | torch.device`, *optional*): where to run; default the model's current device.
        progress (`bool`, *optional*, defaults to True): show a progress bar on stderr, through transformers' tqdm,
            so ``transformers.utils.logging.disable_progress_bar()`` (or ``HF_HUB_DISABLE_PROGRESS_BARS=1``) hides
            it as it hides transformers' own.

    Returns:
        `dict`: ``perplexity``, ``nll`` (mean negative log-likelihood per scored token, nats), ``num_tokens``
        (scored tokens), ``num_windows``, ``max_length``, ``stride``, ``seconds``, ``tokens_per_second``.

    Examples::

        >>> result = perplexity(model, tokenizer, "wiki.valid.tokens.gz", max_length=1024, stride=512)
        >>> round(result["perplexity"], 2)
    """
    import torch
    from transformers.utils.logging import tqdm  # honours transformers.utils.logging.disable_progress_bar()

    from hf_sparse_attn.training.metrics import load_perplexity_metric

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

    if (text_path is None) == (text is None):
        raise ValueError("give exactly one of text_path and text")
    if text is None:
        text = load_eval_text(text_path)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # [N]
    windows = sliding_windows(len(ids), max_length, stride)
    if not windows:
        raise ValueError(f"{text_path or 'text'}: the text has {len(ids)} token(s); at least 2 are needed")

    metric = load_perplexity_metric()
    start = time.perf_counter()
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
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # [B, L-1, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # the identity on our heads' log-probabilities
        nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
        # >= 0: log_softmax of a head's log-probabilities can round to +1e-7 where p ~ 1
        metric.add_batch(predictions=nll[scored].clamp(min=0.0).double().tolist())
    seconds = time.perf_counter() - start
    score = metric.compute()
    num_scored = score["num_tokens"]
    return {
        "perplexity": score["perplexity"],
        "nll": score["nll"],
        "num_tokens": num_scored,
        "num_windows": len(windows),
        "max_length": max_length,
        "stride": stride,
        "seconds": seconds,
        "tokens_per_second": num_scored / seconds if seconds > 0 else float("inf"),
    }
