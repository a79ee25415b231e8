"""What the reproduction drivers share: a grid of recipe runs, one JSON per finished run, skipped on restart.

A driver (``glue.py``, ``lm_heads.py``) builds a list of :class:`Run` — the recipe (``recipes/<name>.py``), its
arguments and the stated hyper-parameters — and hands it to :func:`main`, which parses the common options, filters the
grid (``--only``), lists it (``--dry-run``, with a CPU-time estimate) or runs what is not finished yet. Each finished
run writes ``<results-dir>/<table>/<name>-<hash>.json``; ``<hash>`` covers the run's hyper-parameters (not paths), so
a run with other settings (a shortened sizing run, say) never counts as the same run.

A run trains in ``<checkpoint-dir>/<table>/<name>-<hash>`` (``--save_strategy epoch``, so an interrupted run resumes
from its last epoch, as the recipes do). The folder of each setting's first seed is kept: the reference checkpoint
that the recipe saved with ``save_pretrained`` (the model the run was scored with), for the model cards and as a
starting point; the other seeds' folders are deleted once their JSON is written.

The JSON holds: ``config`` (the hyper-parameters), ``argv`` (the recipe arguments), ``metrics`` (``eval`` and any
extra evaluation such as ``test``), ``train`` (the recipe's ``train_results.json``), ``steps``, ``wall_seconds``,
``cpu_seconds`` (user + system of the recipe processes; with ``resumed`` true they cover only the part after the
restart, so the time figures skip such runs), ``parameters`` (of the saved model), ``log_history`` (the
Trainer's: the learning-curve points and the logged ``sparsity/*``), ``machine`` and versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results" / "reproduce"
CHECKPOINT_DIR = Path("/tmp/reproduce_ckpts")
#: where the data lives unless ``--data-dir`` / ``$HF_SPARSE_ATTN_DATA`` say otherwise (the tests use the same)
DATA_ENV = "HF_SPARSE_ATTN_DATA"
#: recipe options every run gets: CPU, no reporting, no progress bars, an epoch checkpoint to resume from
COMMON_RECIPE_ARGS = (
    "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "epoch", "--save_total_limit", "1",
    "--eval_strategy", "epoch",
)  # fmt: skip


@dataclass(frozen=True)
class Run:
    """One point of a grid.

    Args:
        table: the table it belongs to (the results sub-folder), e.g. ``"glue"``.
        setting: the row it is averaged into, e.g. ``"rte/r=0.5"`` (one per seed).
        seed: the training seed.
        recipe: ``"classification"`` or ``"causal_lm"`` (``recipes/<recipe>.py``).
        argv: the recipe's arguments, without ``--output_dir`` and ``--seed`` (the runner adds them).
        config: the stated hyper-parameters (no paths); hashed into the file name.
        steps: optimizer steps the run will take (for the estimate).
        evaluations: extra evaluation-only runs of the saved model: ``(key, recipe arguments)``; their metrics land
            in ``metrics[key]``.
        requires: the run whose kept checkpoint ``argv`` starts from (it must have finished first).
        keep: keep the checkpoint folder (each setting's first seed).
    """

    table: str
    setting: str
    seed: int
    recipe: str
    argv: tuple[str, ...]
    config: dict[str, Any]
    steps: int
    evaluations: tuple[tuple[str, tuple[str, ...]], ...] = ()
    requires: Run | None = None
    keep: bool = False

    @property
    def name(self) -> str:
        """``<setting>-seed<seed>`` with ``/`` and ``=`` made file-name safe, e.g. ``rte-r0.5-seed0``."""
        return f"{self.setting.replace('/', '-').replace('=', '')}-seed{self.seed}"

    @property
    def tag(self) -> str:
        """Hash of the hyper-parameters and the seed (8 hex digits)."""
        text = json.dumps({"config": self.config, "seed": self.seed, "recipe": self.recipe}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def result_path(self, results_dir: Path) -> Path:
        return results_dir / self.table / f"{self.name}-{self.tag}.json"

    def checkpoint(self, checkpoint_dir: Path) -> Path:
        """Where it trains; tagged like the result, so a run never resumes another configuration's checkpoint."""
        return checkpoint_dir / self.table / f"{self.name}-{self.tag}"


def default_data_dir() -> Path:
    """``$HF_SPARSE_ATTN_DATA``, else the development setup's data folder (``shared/data`` beside the checkout)."""
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every driver takes."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help=f"folder holding glue/, ptb/, wikitext-2/ (default: ${DATA_ENV})",
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the run JSON files go")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=CHECKPOINT_DIR,
        help="where runs train; each setting's first seed is kept there",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only the runs whose name matches this shell pattern (repeatable), e.g. 'rte-*-seed0'",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the grid and its CPU-time estimate; run nothing")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="OMP_NUM_THREADS of each recipe process",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="call the recipes' main(argv) in this process instead of a subprocess each",
    )


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
    """The runs whose name matches one of ``patterns`` (all without patterns)."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate run names in the grid: {sorted(n for n in names if names.count(n) > 1)}")
    return [run for run in runs if not patterns or any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]


def machine(threads: int) -> dict[str, Any]:
    """The machine and the versions a result was measured with."""
    import datasets
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "git_commit": commit or None,
    }


def call_recipe(recipe: str, argv: Sequence[str], *, threads: int, in_process: bool) -> float:
    """Run ``recipes/<recipe>.py`` with ``argv``; returns the CPU seconds (user + system) it used."""
    path = REPO / "recipes" / f"{recipe}.py"
    if in_process:
        started = time.process_time()
        name = f"_reproduce_recipe_{recipe}"
        if name not in sys.modules:  # a recipe is a script, not a package module: load it by path once
            spec = importlib.util.spec_from_file_location(name, path)
            sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
            spec.loader.exec_module(sys.modules[name])
        sys.modules[name].main(list(argv))
        return time.process_time() - started
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    subprocess.run([sys.executable, str(path), *argv], check=True, cwd=REPO, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def saved_parameters(folder: Path) -> int:
    """Parameters stored in ``folder``'s safetensors files (tied weights count once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def execute(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """Train (and evaluate) one run; write and return its JSON record."""
    out = run.checkpoint(args.checkpoint_dir)
    threads, in_process = args.threads, args.in_process
    resumed = any(out.glob("checkpoint-*"))  # then the times below cover only the part after the restart
    started, cpu = time.perf_counter(), 0.0
    argv = [*run.argv, *COMMON_RECIPE_ARGS, "--seed", str(run.seed), "--output_dir", str(out)]
    cpu += call_recipe(run.recipe, argv, threads=threads, in_process=in_process)
    metrics = {"eval": json.loads((out / "eval_results.json").read_text())}
    for key, extra in run.evaluations:
        eval_argv = [
            *extra,
            "--model_name_or_path",
            str(out),
            "--do_eval",
            "--use_cpu",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out / f"eval-{key}"),
        ]
        cpu += call_recipe(run.recipe, eval_argv, threads=threads, in_process=in_process)
        metrics[key] = json.loads((out / f"eval-{key}" / "eval_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    record = {
        "table": run.table,
        "setting": run.setting,
        "seed": run.seed,
        "name": run.name,
        "config": run.config,
        "recipe": f"recipes/{run.recipe}.py",
        "argv": argv,
        "metrics": metrics,
        "train": json.loads((out / "train_results.json").read_text()),
        "steps": state["global_step"],
        "resumed": resumed,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": cpu,
        "parameters": saved_parameters(out),
        "log_history": state["log_history"],
        "checkpoint": str(out) if run.keep else None,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(threads),
    }
    path = run.result_path(args.results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)  # atomic: a killed driver leaves no half-written result that would count as finished
    if not run.keep:
        shutil.rmtree(out, ignore_errors=True)
    return record


def seconds_per_step(results_dir: Path, table: str) -> dict[str, float]:
    """Median CPU seconds per optimizer step of the finished runs of ``table`` anywhere under ``results_dir`` (the
    table's folder and shortened sizing runs in ``sizing/<table>``), by setting."""
    measured: dict[str, list[float]] = {}
    for path in sorted(results_dir.rglob("*.json")) if results_dir.is_dir() else []:
        record = json.loads(path.read_text())
        if record.get("table") == table and record.get("steps") and not record["resumed"]:
            measured.setdefault(record["setting"], []).append(record["cpu_seconds"] / record["steps"])
    return {setting: statistics.median(values) for setting, values in measured.items()}


def dry_run(runs: Sequence[Run], args: argparse.Namespace) -> str:
    """The grid as text: each run, its steps, whether it is done, and the CPU-time estimate of what is left."""
    lines, left_steps, left_seconds, unmeasured = [], 0, 0.0, set()
    for table in sorted({run.table for run in runs}):
        rates = seconds_per_step(args.results_dir, table)
        fallback = statistics.mean(rates.values()) if rates else None
        for run in (r for r in runs if r.table == table):
            done = run.result_path(args.results_dir).is_file()
            lines.append(f"{'done' if done else 'todo'}  {table}/{run.name}  {run.steps} steps")
            if done:
                continue
            left_steps += run.steps
            rate = rates.get(run.setting, fallback)
            if run.setting not in rates:
                unmeasured.add(run.setting)
            left_seconds += run.steps * rate if rate is not None else 0.0
    todo = sum(line.startswith("todo") for line in lines)
    lines.append(f"{len(runs)} runs, {todo} to do, {left_steps} optimizer steps left")
    if left_seconds:
        lines.append(
            f"estimate: {left_seconds / 3600:.1f} CPU-hours at {args.threads} thread(s) per run "
            f"(measured seconds per step; {len(unmeasured)} setting(s) without a measurement use the "
            "mean of the measured ones)"
        )
    else:
        lines.append("estimate: no measured run yet (run one setting shortened with --results-dir .../sizing)")
    return "\n".join(lines)


def main(
    build: Callable[[argparse.Namespace], list[Run]],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse the options, build the grid, and list it (``--dry-run``) or run every run not finished yet, in grid
    order; ``prepare`` (e.g. building a tokenizer) runs once before the first run that trains."""
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    runs = select(build(args), args.only)
    if not runs:
        raise ValueError(f"--only {args.only}: no run of the grid matches")
    if args.dry_run:
        print(dry_run(runs, args))
        return 0
    finished = {run.name for run in runs if run.result_path(args.results_dir).is_file()}
    prepared = False
    for run in runs:
        if run.name in finished:
            print(f"skip {run.table}/{run.name} (done)", flush=True)
            continue
        origin = run.requires
        if origin is not None and not (origin.checkpoint(args.checkpoint_dir) / "config.json").is_file():
            raise FileNotFoundError(
                f"{run.name} starts from {origin.name}'s checkpoint, which is not in {args.checkpoint_dir}: "
                f"run it first (--only {origin.name})"
            )
        if prepare is not None and not prepared:
            prepare(args)
            prepared = True
        print(f"run {run.table}/{run.name}", flush=True)
        record = execute(run, args)
        print(f"done {run.table}/{run.name}: {json.dumps(record['metrics'])}", flush=True)
    return 0
