"""``hf-sparse-attn calibrate``: choose a checkpoint's r-softmax rates from data, save it patched with a report.

Loads ``MODEL`` (a Hub id or a local directory; the class is the one ``config.json`` names, or ``--task``'s),
tokenizes the first ``--num-sentences`` sentences of ``--data`` and runs :func:`hf_sparse_attn.calibrate` on them.
The next ``--held-out`` sentences measure the chosen rates on data the search has not seen
(:func:`hf_sparse_attn.calibrate.measure_calibration`). Into ``--output-dir`` go the patched model and tokenizer
(``save_pretrained``), ``calibration.json`` (the report; ``calibration_held_out.json`` for the held-out sentences),
``calibration.png`` (the heat map, when matplotlib is installed) and ``README.md``: the model card of
:func:`hf_sparse_attn.publishing.hub.write_model_card` with a calibration section that shows the map and the rate
of every layer and head. ``hf-sparse-attn push DIR REPO`` later keeps that section.

``--data`` is a text file (one sentence per line; ``.gz`` is read as gzip), a ``.tsv`` file with a header (column
``--text-column``; GLUE's ``SST-2/train.tsv`` for instance), or a Hub dataset id (``--data-config``, ``--split``,
``--text-column``; e.g. ``--data nyu-mll/glue --data-config sst2``).

Examples::

    $ hf-sparse-attn calibrate sentence-transformers/all-MiniLM-L6-v2 --data glue/SST-2/train.tsv \\
        --budget 0.01 --granularity head --output-dir minilm-calibrated
    $ hf-sparse-attn calibrate openai-community/gpt2 --data nyu-mll/glue --data-config sst2 \\
        --target-sparsity 0.6 --output-dir gpt2-calibrated
"""

from __future__ import annotations

import argparse
import csv
import gzip
import sys
from pathlib import Path
from typing import Any

REPORT_FILE, HELD_OUT_FILE, HEATMAP_FILE = "calibration.json", "calibration_held_out.json", "calibration.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-sparse-attn calibrate``."""
    from hf_sparse_attn.commands.publish import add_task_argument

    parser.add_argument("model", help="Hub model id (e.g. openai-community/gpt2) or local checkpoint directory")
    parser.add_argument("--data", required=True, help="text file (a sentence per line), .tsv file, or Hub dataset id")
    parser.add_argument("--text-column", default="sentence", help="column holding the text (.tsv and Hub datasets)")
    parser.add_argument("--data-config", help="configuration of a Hub dataset, e.g. sst2 for nyu-mll/glue")
    parser.add_argument("--split", default="train", help="split of a Hub dataset")
    parser.add_argument("--num-sentences", type=int, default=256, help="calibration sentences (the first ones)")
    parser.add_argument("--held-out", type=int, default=64, help="next sentences to measure the result on (0: off)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per forward pass")
    parser.add_argument("--max-length", type=int, default=128, help="truncate sentences to this many tokens")
    goal = parser.add_mutually_exclusive_group()
    goal.add_argument("--budget", type=float, help="largest output change allowed (default 0.01)")
    goal.add_argument("--target-sparsity", type=float, help="mean zero fraction to reach instead of a budget")
    parser.add_argument("--granularity", choices=("head", "layer"), default="head", help="one rate per head or layer")
    parser.add_argument(
        "--measure",
        choices=("auto", "kl", "hidden"),
        default="auto",
        help="output change: kl (output distribution), hidden (final hidden state); auto: kl with an LM head",
    )
    add_task_argument(parser)
    parser.add_argument("--output-dir", required=True, help="directory for the patched checkpoint, card and report")


def load_sentences(data: str, *, text_column: str, data_config: str | None = None, split: str = "train") -> list[str]:
    """The non-empty texts of ``data``: a text file (one per line, ``.gz`` as gzip), a ``.tsv`` file with a header
    (column ``text_column``, read without CSV quoting as GLUE needs), or a Hub dataset (``data_config``, ``split``)."""
    path = Path(data)
    if path.is_file():
        if path.suffix == ".tsv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = next(rows, [])
                if text_column not in header:
                    raise ValueError(f"--text-column: {path} has no column {text_column!r}; its columns: {header}")
                column = header.index(text_column)
                texts = [row[column] for row in rows if len(row) > column]
        else:
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
                texts = f.read().splitlines()
    else:
        import datasets

        dataset = datasets.load_dataset(data, data_config, split=split)
        if text_column not in dataset.column_names:
            raise ValueError(
                f"--text-column: {data} has no column {text_column!r}; its columns: {dataset.column_names}"
            )
        texts = dataset[text_column]
    texts = [text.strip() for text in texts if text and text.strip()]
    if not texts:
        raise ValueError(f"--data: {data} holds no text")
    return texts


def run(args: argparse.Namespace) -> int:
    """Load, calibrate, patch, save with report and card; returns the exit status."""
    from transformers import AutoTokenizer

    from hf_sparse_attn.calibrate import calibrate, measure_calibration
    from hf_sparse_attn.calibration_report import add_to_card
    from hf_sparse_attn.commands.publish import load_model
    from hf_sparse_attn.patch import get_patch_config, patch_model, set_sparsity
    from hf_sparse_attn.publishing import hub

    for name in ("num_sentences", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.held_out < 0:
        raise ValueError(f"--held-out must be >= 0; got {args.held_out}")
    texts = load_sentences(args.data, text_column=args.text_column, data_config=args.data_config, split=args.split)
    if len(texts) <= args.num_sentences and args.held_out:
        raise ValueError(
            f"--data has {len(texts)} texts: none left for --held-out after --num-sentences {args.num_sentences}; "
            "lower --num-sentences or pass --held-out 0"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(args.model, args.task, None, None, None)
    calibration = _batches(tokenizer, texts[: args.num_sentences], args.batch_size, args.max_length)
    held_out = texts[args.num_sentences : args.num_sentences + args.held_out]

    rates = calibrate(
        model,
        calibration,
        budget=args.budget,
        granularity=args.granularity,
        target_sparsity=args.target_sparsity,
        measure=args.measure,
    )
    report = rates.report
    print(report.table())
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.save(out / REPORT_FILE)
    if held_out:
        check = measure_calibration(
            model, _batches(tokenizer, held_out, args.batch_size, args.max_length), rates, measure=report.measure
        )
        check.save(out / HELD_OUT_FILE)
        print(f"\nheld out: {check.summary()}")

    if get_patch_config(model) is None:
        patch_model(model, sparsity=rates)
    else:  # a patched checkpoint keeps its LM head
        set_sparsity(model, rates)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    try:
        image = report.heatmap(out / HEATMAP_FILE).name
    except ImportError as err:
        image = None
        print(f"note: no heat map written ({err})", file=sys.stderr)
    hub.write_model_card(model, out, measured_sparsity=report.layer_sparsity)
    add_to_card(out / "README.md", report, image)
    written = ", ".join(p.name for p in (out / REPORT_FILE, out / HELD_OUT_FILE, out / HEATMAP_FILE) if p.is_file())
    print(f"\nSaved {type(model).__name__} with the calibrated rates to {out} (with README.md, {written})")
    return 0


def _batches(tokenizer: Any, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]
