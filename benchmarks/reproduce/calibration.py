"""Issue 15's evidence: a calibrated per-head rate map versus the uniform r = 0.5 at the same mean sparsity, fine-tuned.

For each task (default SST-2 and RTE) and seed (default 0, 1, 2), two runs with identical hyper-parameters:

- **uniform**: table 1's ``r=0.5`` run (``glue.py``; the same run and the same result file, so a run either driver
  finished counts for both);
- **calibrated**: the same run with ``--sparsity`` set to a per-head map from :func:`hf_sparse_attn.calibrate`,
  warmed up from 0 over the same steps. The map is computed once per task, before fine-tuning, on the first
  ``--calibration-sentences`` training examples (pairs for RTE, encoded as the recipe encodes them) with
  ``target_sparsity`` = the mean zero fraction that r = 0.5 gives on those examples, so both runs have the same mean
  sparsity and the map spends it where the output changes least. It is stored in ``calibration/map-<task>-<hash>.json``
  (both reports: per head the rate, zero fraction and attention error; the output change of each).

Every run is one JSON file written by the shared runner (``runner.py``: resumable, ``--only``, ``--dry-run`` with a
CPU-time estimate, ``--threads``). After running, the driver prints the metric of both methods per task (mean ±
standard deviation over the finished seeds).

    python -m benchmarks.reproduce.calibration --data-dir DATA               # the grid (resumes)
    python -m benchmarks.reproduce.calibration --data-dir DATA --dry-run     # list it with its CPU-time estimate
    python -m benchmarks.reproduce.calibration --data-dir DATA --only 'rte-calibrated-seed0'

Data: the GLUE TSV release in ``<data-dir>/glue``, as for ``glue.py``; all of ``glue.py``'s options apply.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.reproduce import glue
from benchmarks.reproduce.runner import Run
from benchmarks.reproduce.runner import main as run_grid

TABLE = "calibration"
#: the uniform setting of table 1 that the calibrated map is compared with, and its rate
UNIFORM, UNIFORM_RATE = "r=0.5", 0.5
#: how the calibration batches are formed (sentences per forward pass)
CALIBRATION_BATCH = 32
#: file-name prefix of the calibration maps, which live beside the run JSON files of this table
MAP_PREFIX = "map-"
_NOT_YET = "(computed before the first run)"


def parser() -> argparse.ArgumentParser:
    p = glue.parser()
    p.description = __doc__.split("\n\n")[0]
    p.set_defaults(tasks="sst2,rte")
    p.add_argument("--calibration-sentences", type=int, default=256, help="training examples to calibrate on")
    return p


def calibration_settings(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """What the map depends on (hashed into its file name and into the calibrated runs' configuration)."""
    from hf_sparse_attn.calibrate import GRID

    return {
        "model": args.model or f"{glue.BASE_MODEL} (packaged)",
        "task": task,
        "sentences": args.calibration_sentences,
        "max_seq_length": args.max_seq_length,
        "granularity": "head",
        "grid": list(GRID),
        "target_sparsity": f"mean zero fraction of uniform r = {UNIFORM_RATE} on the same examples",
    }


def map_path(settings: dict[str, Any], args: argparse.Namespace) -> Path:
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return args.results_dir / TABLE / f"{MAP_PREFIX}{settings['task']}-{tag}.json"


def calibration_map(model_path: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The uniform rate's report and the calibrated map's report at the same mean sparsity (computed once)."""
    path = map_path(settings, args)
    if path.is_file():
        return json.loads(path.read_text())
    import time

    import transformers

    from hf_sparse_attn.calibrate import calibrate, measure_calibration
    from hf_sparse_attn.training.data import load_classification

    data = load_classification(task_name=settings["task"], data_dir=str(args.data_dir / "glue"), splits=["train"])
    train = data.raw["train"]
    rows = train.select(range(min(settings["sentences"], train.num_rows)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    model = transformers.AutoModel.from_pretrained(model_path)
    options = {"padding": True, "truncation": True, "max_length": settings["max_seq_length"], "return_tensors": "pt"}
    batches = [
        dict(tokenizer(*(rows[column][start : start + CALIBRATION_BATCH] for column in data.text_columns), **options))
        for start in range(0, rows.num_rows, CALIBRATION_BATCH)
    ]
    started = time.process_time()
    uniform = measure_calibration(model, batches, UNIFORM_RATE)
    rates = calibrate(model, batches, target_sparsity=uniform.mean_sparsity, granularity="head")
    result = {
        "settings": settings,
        "uniform": uniform.to_dict(),
        "calibrated": rates.report.to_dict(),
        "cpu_seconds": time.process_time() - started,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def build(args: argparse.Namespace) -> list[Run]:
    """Per task and seed: table 1's uniform run, then the calibrated run with the same hyper-parameters."""
    runs = []
    for uniform in (run for run in glue.build(args) if run.setting.endswith(f"/{UNIFORM}")):
        task = uniform.config["task"]
        argv = list(uniform.argv)
        settings = calibration_settings(task, args)
        if args.dry_run and not map_path(settings, args).is_file():
            rates: Any = _NOT_YET
        else:
            model_path = argv[argv.index("--model_name_or_path") + 1]
            rates = calibration_map(model_path, settings, args)["calibrated"]["rates"]
        argv[argv.index("--sparsity") + 1] = rates if isinstance(rates, str) else json.dumps(rates)
        calibrated = Run(
            table=TABLE,
            setting=f"{task}/calibrated",
            seed=uniform.seed,
            recipe=uniform.recipe,
            argv=tuple(argv),
            config={**uniform.config, "sparsity": "calibrated per head", "calibration": settings},
            steps=uniform.steps,
            keep=uniform.keep,
        )
        runs += [uniform, calibrated]
    return runs


def summary(args: argparse.Namespace) -> str:
    """The metric of both methods per task over the finished runs of this grid, as a Markdown table."""
    lines = [
        "| task | method | mean sparsity | output change | metric | mean ± sd | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    grid = build_quietly(args)
    for task in args.tasks.split(","):
        maps = map_path(calibration_settings(task, args), args)
        reports = json.loads(maps.read_text()) if maps.is_file() else {}
        for method, setting in (("uniform", f"{task}/{UNIFORM}"), ("calibrated", f"{task}/calibrated")):
            paths = [run.result_path(args.results_dir) for run in grid if run.setting == setting]
            values = [json.loads(p.read_text())["metrics"]["eval"][glue.METRIC[task]] for p in paths if p.is_file()]
            if not values:
                continue
            report = reports.get(method, {})
            sd = statistics.stdev(values) if len(values) > 1 else math.nan
            lines.append(
                f"| {task} | {method} | {report.get('mean_sparsity', math.nan):.3f} | "
                f"{report.get('output_change', math.nan):.4f} | {glue.METRIC[task]} | "
                f"{statistics.mean(values):.4f} ± {sd:.4f} | {', '.join(f'{v:.4f}' for v in values)} |"
            )
    return "\n".join(lines)


def build_quietly(args: argparse.Namespace) -> list[Run]:
    """The grid without computing a missing map (result paths depend on the configuration only)."""
    return build(argparse.Namespace(**{**vars(args), "dry_run": True}))


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    status = run_grid(build, p, argv)
    args = p.parse_args(argv)
    if not args.dry_run:
        print(summary(args))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
