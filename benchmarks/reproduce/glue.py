"""Table 1: r-softmax attention in the pretrained all-MiniLM-L6-v2, fine-tuned on five GLUE tasks.

The grid: CoLA, SST-2 (the first 10,000 training sentences), MRPC, STS-B, RTE; softmax and r-softmax with
r ∈ {0.25, 0.5, 0.75}, the rate warmed up linearly from 0 over the first 10 % of the optimizer steps; 3 seeds for
softmax and r = 0.5, the first seed for the others. Every run fine-tunes with ``recipes/classification.py`` and the
same hyper-parameters (below; the options change them for every setting alike) and is scored on the task's dev set
(GLUE's test labels are not public) with the task's GLUE metric, after the last epoch (no selection on dev). The
measured sparsity is the fraction of exact zeros among the attention weights of valid keys on the first 32 dev
examples, logged during training (``sparsity/mean``); the summariser takes the last value.

    python -m benchmarks.reproduce.glue                          # the whole grid (resumes)
    python -m benchmarks.reproduce.glue --dry-run                # list it with its CPU-time estimate
    python -m benchmarks.reproduce.glue --only 'rte-*-seed0'     # a subset
    python -m benchmarks.reproduce.summarise                     # tables and plots into docs/results.md

Data: the GLUE TSV release in ``<data-dir>/glue`` (``CoLA/``, ``SST-2/``, ... with ``train.tsv`` / ``dev.tsv``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from benchmarks.reproduce.runner import Run
from benchmarks.reproduce.runner import main as run_grid

TABLE = "glue"
TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")
#: the metric each task is reported with (the first of its GLUE metrics), as ``eval_results.json`` names it
METRIC = {
    "cola": "eval_matthews_correlation",
    "sst2": "eval_accuracy",
    "mrpc": "eval_f1",
    "stsb": "eval_pearson",
    "rte": "eval_accuracy",
}
#: (setting, rate, every seed?) — softmax and r = 0.5 get all seeds, the other rates the first one
SETTINGS = (("softmax", None, True), ("r=0.25", 0.25, False), ("r=0.5", 0.5, True), ("r=0.75", 0.75, False))
#: the fixed SST-2 training subset (its first rows), as the issue allows; the other tasks train on all rows
SST2_TRAIN_ROWS = 10_000
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"checkpoint to fine-tune (default: the packaged {BASE_MODEL})")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of GLUE tasks")
    p.add_argument("--seeds", default="0,1,2", help="seeds of softmax and r = 0.5 (the other rates: the first)")
    p.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size")
    p.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW peak learning rate (linear decay)")
    p.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.1,
        help="learning-rate and rate warm-up, fraction of the optimizer steps",
    )
    p.add_argument("--max-seq-length", type=int, default=128, help="truncate sentence (pairs) to this")
    p.add_argument(
        "--max-train-samples",
        type=int,
        default=None,
        help=f"first N training examples of every task (default: all; SST-2 {SST2_TRAIN_ROWS})",
    )
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N dev examples (default: all)")
    return p


def train_rows(task: str, args: argparse.Namespace) -> int:
    """Training examples the run sees: the file's rows, capped."""
    from hf_sparse_attn.training.data import load_classification

    rows = load_classification(task_name=task, data_dir=str(args.data_dir / "glue"), splits=["train"]).raw
    cap = args.max_train_samples or (SST2_TRAIN_ROWS if task == "sst2" else None)
    return min(rows["train"].num_rows, cap) if cap else rows["train"].num_rows


def build(args: argparse.Namespace) -> list[Run]:
    """The grid, in the order it runs: task by task, softmax first (the reference of the time ratios)."""
    if args.model is None:
        from hf_sparse_attn.commands.packaged_model import verified_minilm_path

        model_path, model_name = str(verified_minilm_path()), f"{BASE_MODEL} (packaged)"
    else:
        model_path = model_name = args.model
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = []
    for task in args.tasks.split(","):
        if task not in TASKS:
            raise ValueError(f"--tasks: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        rows = train_rows(task, args)
        steps = math.ceil(math.ceil(rows / args.batch_size) * args.epochs)
        warmup = max(1, round(args.warmup_fraction * steps))
        config = {
            "model": model_name,
            "task": task,
            "train_rows": rows,
            "max_eval_samples": args.max_eval_samples,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "lr_schedule": "linear",
            "weight_decay": 0.01,
            "warmup_steps": warmup,
            "max_seq_length": args.max_seq_length,
            "sparsity_probe_size": 32,
        }
        argv = [
            "--model_name_or_path", model_path, "--task_name", task, "--data_dir", str(args.data_dir / "glue"),
            "--do_train", "--do_eval", "--max_train_samples", str(rows), "--num_train_epochs", str(args.epochs),
            "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "128",
            "--learning_rate", str(args.learning_rate), "--weight_decay", "0.01", "--warmup_steps", str(warmup),
            "--max_seq_length", str(args.max_seq_length), "--logging_steps", str(max(1, steps // 30)),
            "--sparsity_probe_size", "32"
        ]  # fmt: skip
        if args.max_eval_samples:
            argv += ["--max_eval_samples", str(args.max_eval_samples)]
        for setting, rate, all_seeds in SETTINGS:
            patch = [] if rate is None else ["--sparsity", str(rate), "--sparsity_warmup_steps", str(warmup)]
            for seed in seeds if all_seeds else seeds[:1]:
                runs.append(
                    Run(
                        table=TABLE,
                        setting=f"{task}/{setting}",
                        seed=seed,
                        recipe="classification",
                        argv=(*argv, *patch),
                        config={**config, "sparsity": rate},
                        steps=steps,
                        keep=seed == seeds[0],
                    )
                )
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    return run_grid(build, parser(), argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
