"""Evidence for issue 15: a calibrated per-head rate map versus one uniform rate at the same mean sparsity, fine-tuned.

For each GLUE task (default SST-2 and RTE):

1. **Calibrate once** (seed-independent): all-MiniLM-L6-v2 (or ``--model``) as a plain encoder, the first
   ``--calibration-sentences`` training sentences (pairs for RTE, encoded as the recipe encodes them). The uniform
   rate ``--uniform-rate`` is measured there (its mean zero fraction ``s``); then
   ``hf_sparse_attn.calibrate(model, batches, target_sparsity=s, granularity="head")`` gives the per-head map with
   the same mean sparsity and the smallest predicted output change. Written to ``calibration-<task>-<tag>.json``
   (both reports).
2. **Fine-tune** with ``recipes/classification.py`` (a subprocess per run; identical options, ``--sparsity`` either
   the uniform rate or the map as JSON, both warmed up from 0 over the same steps) for every seed in ``--seeds``,
   and read its ``eval_results.json``. One JSON per run: ``<task>-<method>-seed<seed>-<tag>.json``.
3. Print the table: the metric of each method per task, mean ± standard deviation over seeds.

Resumable: a run whose JSON exists is skipped, so an interrupted grid continues where it stopped. ``<tag>`` is a hash
of the options that change results, so runs of different configurations never mix. ``--only task:method:seed`` runs
a subset (repeatable), e.g. one smoke configuration.

Examples::

    python benchmarks/reproduce/calibration.py --data-dir PATH/TO/glue              # the whole grid
    python benchmarks/reproduce/calibration.py --data-dir PATH/TO/glue --only sst2:calibrated:0 \\
        --train-samples 64 --eval-samples 64 --epochs 1 --calibration-sentences 64 --results-dir /tmp/smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results" / "reproduce"
RECIPE = REPO / "recipes" / "classification.py"
METHODS = ("uniform", "calibrated")
#: metric reported per task (the first GLUE metric of the task)
METRIC = {"sst2": "eval_accuracy", "rte": "eval_accuracy", "mrpc": "eval_f1", "cola": "eval_matthews_correlation",
          "stsb": "eval_pearson"}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint to fine-tune (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data-dir", help="the GLUE TSV release folder (holding SST-2/, RTE/); default: the Hub")
    parser.add_argument("--tasks", default="sst2,rte", help="comma list of GLUE tasks")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of fine-tuning seeds")
    parser.add_argument("--uniform-rate", type=float, default=0.5, help="the uniform r compared against")
    parser.add_argument("--calibration-sentences", type=int, default=256, help="training sentences to calibrate on")
    parser.add_argument("--train-samples", type=int, default=2000, help="first N training examples (0: all)")
    parser.add_argument("--eval-samples", type=int, default=0, help="first N dev examples (0: all)")
    parser.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="AdamW peak learning rate")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="rate warm-up, fraction of the steps")
    parser.add_argument("--max-seq-length", type=int, default=128, help="truncate sentence (pairs) to this")
    parser.add_argument("--only", action="append", default=[], help="run only task:method:seed (repeatable)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON files go")
    return parser.parse_args(argv)


def config_tag(args: argparse.Namespace) -> str:
    """Short hash of every option that changes a result."""
    keys = ("model", "data_dir", "uniform_rate", "calibration_sentences", "train_samples", "eval_samples", "epochs",
            "batch_size", "learning_rate", "warmup_fraction", "max_seq_length")  # fmt: skip
    text = json.dumps({key: getattr(args, key) for key in keys}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def machine() -> dict[str, Any]:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "git_commit": commit,
            "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip


def calibration_map(task: str, model_path: str, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The uniform rate's measured sparsity and the per-head map at that sparsity (computed once, then read)."""
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    import transformers

    from hf_sparse_attn.calibrate import calibrate, measure_calibration
    from hf_sparse_attn.recipe_data import load_classification

    data = load_classification(task_name=task, data_dir=args.data_dir, splits=["train"])
    rows = data.raw["train"].select(range(min(args.calibration_sentences, data.raw["train"].num_rows)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModel.from_pretrained(model_path)
    texts = [rows[column] for column in data.text_columns]
    batches = []
    for start in range(0, rows.num_rows, 32):
        chunk = [column[start : start + 32] for column in texts]
        batches.append(dict(tokenizer(*chunk, padding=True, truncation=True, max_length=args.max_seq_length,
                                      return_tensors="pt")))  # fmt: skip
    started = time.perf_counter()
    torch.manual_seed(0)
    uniform = measure_calibration(model, batches, args.uniform_rate)
    rates = calibrate(model, batches, target_sparsity=uniform.mean_sparsity, granularity="head")
    result = {
        "task": task,
        "uniform": uniform.to_dict(),
        "calibrated": rates.report.to_dict(),
        "seconds": time.perf_counter() - started,
        "machine": machine(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def fine_tune(task: str, method: str, seed: int, sparsity: Any, model_path: str, args: argparse.Namespace) -> dict:
    """One recipe run in a subprocess; its evaluation metrics and wall time."""
    with tempfile.TemporaryDirectory() as out:
        command = [
            sys.executable, str(RECIPE), "--model_name_or_path", model_path, "--task_name", task,
            "--sparsity", json.dumps(sparsity), "--sparsity_warmup_steps", str(warmup_steps(task, args)),
            "--do_train", "--do_eval", "--seed", str(seed), "--num_train_epochs", str(args.epochs),
            "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "64",
            "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1", "--max_seq_length",
            str(args.max_seq_length), "--save_strategy", "no", "--report_to", "none", "--use_cpu",
            "--logging_steps", "25", "--disable_tqdm", "true", "--output_dir", out,
        ]  # fmt: skip
        if args.data_dir:
            command += ["--data_dir", args.data_dir]
        if args.train_samples:
            command += ["--max_train_samples", str(args.train_samples)]
        if args.eval_samples:
            command += ["--max_eval_samples", str(args.eval_samples)]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO)
        metrics = json.loads((Path(out) / "eval_results.json").read_text())
    return {"metrics": metrics, "seconds": time.perf_counter() - started, "command": command[1:]}


def warmup_steps(task: str, args: argparse.Namespace) -> int:
    """The rate warm-up: ``--warmup-fraction`` of the optimizer steps (the same for both methods)."""
    from hf_sparse_attn.recipe_data import load_classification

    rows = load_classification(task_name=task, data_dir=args.data_dir, splits=["train"]).raw["train"].num_rows
    rows = min(rows, args.train_samples) if args.train_samples else rows
    return max(1, round(args.warmup_fraction * math.ceil(rows / args.batch_size) * args.epochs))


def summary(results: list[dict]) -> str:
    lines = ["| task | method | mean sparsity | metric | mean ± sd | seeds |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        groups.setdefault((result["task"], result["method"]), []).append(result)
    for (task, method), runs in sorted(groups.items()):
        values = [run["metrics"][METRIC[task]] for run in runs]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        cells = ", ".join(f"{v:.4f}" for v in values)
        lines.append(f"| {task} | {method} | {runs[0]['mean_sparsity']:.3f} | {METRIC[task]} | "
                     f"{mean:.4f} ± {sd:.4f} | {cells} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from hf_sparse_attn.packaged_model import verified_minilm_path

        model_path = str(verified_minilm_path())  # args.model stays None: the tag ignores the temporary folder
    else:
        model_path = args.model
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tag, results_dir = config_tag(args), Path(args.results_dir)
    wanted = {tuple(item.split(":")) for item in args.only}
    results = []
    for task in args.tasks.split(","):
        maps = None
        for method in METHODS:
            for seed in (int(s) for s in args.seeds.split(",")):
                if wanted and (task, method, str(seed)) not in wanted:
                    continue
                path = results_dir / f"{task}-{method}-seed{seed}-{tag}.json"
                if path.is_file():
                    print(f"skip {path.name} (done)")
                    results.append(json.loads(path.read_text()))
                    continue
                maps = maps or calibration_map(task, model_path, args, results_dir / f"calibration-{task}-{tag}.json")
                sparsity = args.uniform_rate if method == "uniform" else maps["calibrated"]["rates"]
                print(f"run {task} {method} seed {seed}", flush=True)
                run = fine_tune(task, method, seed, sparsity, model_path, args)
                record = {"task": task, "method": method, "seed": seed, "sparsity": sparsity,
                          "mean_sparsity": maps[method]["mean_sparsity"],
                          "output_change": maps[method]["output_change"], **run,
                          "config": {**vars(args), "tag": tag}, "machine": machine()}  # fmt: skip
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(record, indent=2) + "\n")
                results.append(record)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
