"""Table 2: LM heads in GPT-2-architecture models trained from scratch on PTB and WikiText-2 (word level).

The grid: a 4-layer GPT-2 (d = 128, 4 attention heads, blocks of 128 tokens; d ≪ V, the softmax-bottleneck regime)
with the softmax, sigsoftmax, MoS (K = 4), MoSS (K = 4) and PLIF (1,000 knots on [-20, 20]) heads; 3 seeds on PTB
(Mikolov's version, 10,000 words incl. ``<eos>``), the first seed on WikiText-2 (33,278 words). Every run trains with
``recipes/causal_lm.py`` and the same hyper-parameters (below), evaluates the validation set after every epoch, keeps
the epoch with the lowest validation perplexity, and evaluates it on the test set. Perplexities are per word
(``<eos>`` counted as a word, as in the literature), exp of the mean NLL over all predicted tokens of the 128-token
blocks (no sliding window, so each block's first tokens see little context).

The fine-tuning row (PTB, first seed): the softmax model of ``ptb/softmax`` seed 0 (its best epoch) is patched with
each head and trained for ``--finetune-epochs`` more epochs at ``--finetune-learning-rate``; the ``softmax`` entry of
the row continues the softmax model for the same steps — the plugin's real use, a new head on a trained model.

    python -m benchmarks.reproduce.lm_heads                      # the whole grid (resumes)
    python -m benchmarks.reproduce.lm_heads --dry-run            # list it with its CPU-time estimate
    python -m benchmarks.reproduce.lm_heads --only 'ptb-*-seed0' # a subset

Data: ``<data-dir>/ptb/ptb.{train,valid,test}.txt.gz`` and ``<data-dir>/wikitext-2/wiki.{train,valid,test}.tokens.gz``.
The word-level tokenizer of each corpus (``recipes/word_tokenizer.py`` on its training file) is built once into
``<checkpoint-dir>/lm_heads/tokenizer-<corpus>``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NamedTuple

from benchmarks.reproduce.runner import Run, call_recipe
from benchmarks.reproduce.runner import main as run_grid

TABLE = "lm_heads"


class Corpus(NamedTuple):
    folder: str  #: under the data folder
    pattern: str  #: file name, with ``{split}``
    all_seeds: bool  #: every seed of ``--seeds``, or only the first
    epochs: float  #: default training epochs


CORPORA = {
    "ptb": Corpus("ptb", "ptb.{split}.txt.gz", all_seeds=True, epochs=6.0),
    "wt2": Corpus("wikitext-2", "wiki.{split}.tokens.gz", all_seeds=False, epochs=2.0),
}
#: corpus -> training tokens incl. one <eos> per line (data MANIFEST), for the step count of the estimate
TRAIN_TOKENS = {"ptb": 929_589, "wt2": 2_088_628}
HEADS = ("softmax", "sigsoftmax", "mos", "moss", "plif")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default="ptb,wt2", help="comma list of corpora: ptb, wt2")
    p.add_argument("--heads", default=",".join(HEADS), help="comma list of heads")
    p.add_argument("--seeds", default="0,1,2", help="PTB seeds (WikiText-2: the first)")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--width", type=int, default=128, help="model width d")
    p.add_argument("--block-size", type=int, default=128, help="tokens per training block")
    p.add_argument(
        "--epochs", type=float, default=None, help="training epochs on every corpus (default: PTB 6, WikiText-2 2)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="blocks per optimizer step")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay)")
    p.add_argument("--finetune-epochs", type=float, default=2.0, help="epochs of the fine-tuning row")
    p.add_argument("--finetune-learning-rate", type=float, default=3e-4, help="peak learning rate of the row")
    p.add_argument("--max-train-samples", type=int, default=None, help="first N training blocks (default: all)")
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N validation / test blocks")
    return p


def tokenizer_dir(args: argparse.Namespace, corpus: str):
    return args.checkpoint_dir / TABLE / f"tokenizer-{corpus}"


def data_file(args: argparse.Namespace, corpus: str, split: str) -> str:
    return str(args.data_dir / CORPORA[corpus].folder / CORPORA[corpus].pattern.format(split=split))


def build(args: argparse.Namespace) -> list[Run]:
    """The grid, in the order it runs: per corpus softmax first (the reference of the ratios), then the
    fine-tuning row, which starts from PTB softmax seed 0."""
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be > 0 (or left out: PTB 6, WikiText-2 2); got {args.epochs}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    heads = args.heads.split(",")
    for head in heads:
        if head not in HEADS:
            raise ValueError(f"--heads: unknown head {head!r}; allowed: {', '.join(HEADS)}")
    model = {
        "model": "gpt2",
        "n_layer": args.layers,
        "n_embd": args.width,
        "n_head": 4,
        "n_positions": args.block_size,
        "dropout": 0.1,
    }
    overrides = ",".join(f"{k}={v}" for k, v in model.items() if k not in ("model", "dropout"))
    shared = {
        **model,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "weight_decay": 0.1,
        "lr_schedule": "cosine",
        "warmup_fraction": 0.05,
        "num_mixtures": 4,
        "num_knots": 1000,
        "knot_range": 20.0,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
        "selection": "best validation epoch",
    }

    def recipe_argv(corpus: str, epochs: float, learning_rate: float) -> list[str]:
        argv = [
            "--train_file", data_file(args, corpus, "train"), "--validation_file", data_file(args, corpus, "valid"),
            "--block_size", str(args.block_size), "--do_train", "--do_eval", "--num_train_epochs", str(epochs),
            "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
            "--learning_rate", str(learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
            "--weight_decay", "0.1", "--logging_steps", "25", "--load_best_model_at_end", "true",
            "--metric_for_best_model", "eval_perplexity", "--greater_is_better", "false"
        ]  # fmt: skip
        for option, value in (
            ("--max_train_samples", args.max_train_samples),
            ("--max_eval_samples", args.max_eval_samples),
        ):
            if value:
                argv += [option, str(value)]
        return argv

    def head_argv(head: str) -> list[str]:
        return [] if head == "softmax" else ["--head", head, "--num_mixtures", "4", "--num_knots", "1000"]

    def steps(corpus: str, epochs: float) -> int:
        blocks = TRAIN_TOKENS[corpus] // args.block_size
        blocks = min(blocks, args.max_train_samples) if args.max_train_samples else blocks
        return math.ceil(math.ceil(blocks / args.batch_size) * epochs)

    def test_eval(corpus: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
        test = data_file(args, corpus, "test")  # the recipe needs a training file; it only evaluates here
        argv = [
            "--train_file", test, "--validation_file", test, "--block_size", str(args.block_size),
            "--per_device_eval_batch_size", "64"
        ]  # fmt: skip
        if args.max_eval_samples:
            argv += ["--max_eval_samples", str(args.max_eval_samples)]
        return (("test", tuple(argv)),)

    runs = []
    for corpus in args.corpora.split(","):
        if corpus not in CORPORA:
            raise ValueError(f"--corpora: unknown corpus {corpus!r}; allowed: {', '.join(CORPORA)}")
        corpus_seeds = seeds if CORPORA[corpus].all_seeds else seeds[:1]
        epochs = args.epochs if args.epochs is not None else CORPORA[corpus].epochs
        config = {**shared, "corpus": corpus, "epochs": epochs, "learning_rate": args.learning_rate}
        base = [
            "--model_type",
            "gpt2",
            "--config_overrides",
            overrides,
            "--tokenizer_name",
            str(tokenizer_dir(args, corpus)),
            *recipe_argv(corpus, epochs, args.learning_rate),
        ]
        for head in heads:
            for seed in corpus_seeds:
                runs.append(
                    Run(
                        table=TABLE,
                        setting=f"{corpus}/{head}",
                        seed=seed,
                        recipe="causal_lm",
                        argv=(*base, *head_argv(head)),
                        config={**config, "head": head},
                        steps=steps(corpus, epochs),
                        evaluations=test_eval(corpus),
                        keep=seed == corpus_seeds[0],
                    )
                )
    if "ptb" in args.corpora.split(",") and "softmax" in heads:
        origin = next(run for run in runs if run.setting == "ptb/softmax" and run.seed == seeds[0])
        start = origin.checkpoint(args.checkpoint_dir)
        config = {
            **shared,
            "corpus": "ptb",
            "start": f"ptb/softmax seed {seeds[0]} ({origin.tag})",
            "epochs": args.finetune_epochs,
            "learning_rate": args.finetune_learning_rate,
        }
        argv = [
            "--model_name_or_path",
            str(start),
            *recipe_argv("ptb", args.finetune_epochs, args.finetune_learning_rate),
        ]
        for head in heads:
            runs.append(
                Run(
                    table=TABLE,
                    setting=f"ptb-finetune/{head}",
                    seed=seeds[0],
                    recipe="causal_lm",
                    argv=(*argv, *head_argv(head)),
                    config={**config, "head": head},
                    steps=steps("ptb", args.finetune_epochs),
                    evaluations=test_eval("ptb"),
                    requires=origin,
                    keep=True,
                )
            )
    return runs


def prepare(args: argparse.Namespace) -> None:
    """Build the word-level tokenizer of each corpus once (``recipes/word_tokenizer.py``)."""
    for corpus in args.corpora.split(","):
        folder = tokenizer_dir(args, corpus)
        if not (folder / "tokenizer.json").is_file():
            argv = [data_file(args, corpus, "train"), "--output_dir", str(folder)]
            call_recipe("word_tokenizer", argv, threads=args.threads, in_process=args.in_process)


def main(argv: Sequence[str] | None = None) -> int:
    return run_grid(build, parser(), argv, prepare=prepare)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
