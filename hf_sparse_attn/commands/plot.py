"""``hf-sparse-attn plot OUTPUT_DIR``: draw a Trainer run's loss, metric and per-layer sparsity curves into a PNG.

The drawing is :mod:`hf_sparse_attn.training.plots` (it needs matplotlib: ``pip install "hf-sparse-attn[plot]"``).

Examples::

    $ hf-sparse-attn plot out                     # writes out/training.png
    $ hf-sparse-attn plot out --out docs/images/training.png --title "MiniLM on SST-2, r = 0.5"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_sparse_attn.training.plots import DEFAULT_NAME, output_path, plot_log_history, read_log_history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="Trainer output dir (or a checkpoint-* dir, or a trainer_state.json)")
    parser.add_argument(
        "--out",
        default=None,
        help=f"PNG to write, or a directory for {DEFAULT_NAME} (default: <output_dir>/{DEFAULT_NAME})",
    )
    parser.add_argument("--title", default=None, help="figure title")


def run(args: argparse.Namespace) -> int:
    log_history, state = read_log_history(args.output_dir)
    run_dir = Path(args.output_dir) if Path(args.output_dir).is_dir() else state.parent
    try:
        out = plot_log_history(log_history, output_path(args.out, run_dir), title=args.title)
    except ValueError as err:
        raise ValueError(f"{state}: {err}") from None
    print(f"wrote {out} (from {state})")
    return 0
