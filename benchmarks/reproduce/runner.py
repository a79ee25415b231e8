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

``--jobs N`` runs N runs at once, each in its own recipe subprocesses (``--threads`` threads each), their output in
``<checkpoint-dir>/<table>/<name>-<hash>.log``; a run that starts from another's checkpoint (``requires``) waits for
it, a failed run stops neither the others nor the driver (which exits 1 at the end, naming it). ``--device cuda``
trains on the GPU (the ``--jobs`` runs share it); the hash does not cover the device or ``--jobs``, so GPU runs fill
the same grid. Before a run starts, the driver claims it: ``<name>-<hash>.claim`` beside its checkpoint folder, created
exclusively, holding the host and pid; another driver skips a run whose claim's process is alive and takes over one
whose process is gone, so several drivers (overlapping ``--only``, several machines on one shared folder) can work on
one grid.

The JSON holds: ``config`` (the hyper-parameters), ``argv`` (the recipe arguments), ``metrics`` (``eval`` and any
extra evaluation such as ``test``), ``train`` (the recipe's ``train_results.json``), ``steps``, ``wall_seconds``,
``cpu_seconds`` (user + system of the recipe processes; with ``resumed`` true they cover only the part after the
restart, so the time figures skip such runs), ``parameters`` (of the saved model), ``log_history`` (the
Trainer's: the learning-curve points and the logged ``sparsity/*``), ``machine`` (with ``device``, ``gpu`` on
``cuda``, and ``jobs``) and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results" / "reproduce"
CHECKPOINT_DIR = Path("/tmp/reproduce_ckpts")
#: where the data lives unless ``--data-dir`` / ``$HF_SPARSE_ATTN_DATA`` say otherwise (the tests use the same)
DATA_ENV = "HF_SPARSE_ATTN_DATA"
#: recipe options every run gets (after :func:`device_options`): no reporting, no progress bars, an epoch checkpoint
#: to resume from
COMMON_RECIPE_ARGS = (
    "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "epoch", "--save_total_limit", "1",
    "--eval_strategy", "epoch",
)  # fmt: skip
DEVICES = ("cpu", "cuda")


def device_options(device: str) -> tuple[str, ...]:
    """``--use_cpu`` on the CPU, nothing on ``cuda`` (the Trainer then takes the GPU, shared by concurrent runs)."""
    return ("--use_cpu",) if device == "cpu" else ()


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
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each a recipe subprocess with --threads threads (a 16-core machine: --jobs 16 "
        "--threads 1); their output goes to <checkpoint-dir>/<table>/<run>-<hash>.log",
    )
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where the recipes train; cuda: on the GPU, shared by the --jobs runs (the results fill the same grid)",
    )


def select(runs: Sequence[Run], patterns: Sequence[str]) -> list[Run]:
    """The runs whose name matches one of ``patterns`` (all without patterns)."""
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate run names in the grid: {sorted(n for n in names if names.count(n) > 1)}")
    return [run for run in runs if not patterns or any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]


def machine(threads: int, device: str = "cpu", jobs: int = 1) -> dict[str, Any]:
    """The machine and the versions a result was measured with; ``device`` is where it trained (``gpu``: the GPU's
    name on ``cuda``), ``jobs`` how many runs the driver ran at once (they share the cores or the GPU)."""
    import datasets
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    gpu = {"gpu": torch.cuda.get_device_name()} if device == "cuda" and torch.cuda.is_available() else {}
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "device": device,
        **gpu,
        "jobs": jobs,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "git_commit": commit or None,
    }


def call_recipe(recipe: str, argv: Sequence[str], *, threads: int, in_process: bool, log: Path | None = None) -> float:
    """Run ``recipes/<recipe>.py`` with ``argv``; returns the CPU seconds (user + system) it used.

    ``log``: append the subprocess's output (stdout and stderr) to this file instead of this process's streams.
    Raises :class:`subprocess.CalledProcessError` when the recipe exits non-zero."""
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
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, str(path), *argv]
    with open(log, "a") if log else contextlib.nullcontext() as out:  # noqa: SIM115 (closed by the with)
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        # this child's own usage (and its waited-for children's): with --jobs other recipes end meanwhile, so the
        # whole-process RUSAGE_CHILDREN difference would count theirs too
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # e.g. Ctrl-C: stop the recipe too (as subprocess.run does), it holds the run's claim
            process.kill()
            process.wait()
            raise
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen, which must not wait again
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return usage.ru_utime + usage.ru_stime


def saved_parameters(folder: Path) -> int:
    """Parameters stored in ``folder``'s safetensors files (tied weights count once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    return total


def execute(run: Run, args: argparse.Namespace, log: Path | None = None) -> dict[str, Any]:
    """Train (and evaluate) one run on ``args.device``; write and return its JSON record. ``log``: where the recipe
    subprocesses' output goes (see :func:`call_recipe`)."""
    out = run.checkpoint(args.checkpoint_dir)
    threads, in_process, device = args.threads, args.in_process, args.device
    resumed = any(out.glob("checkpoint-*"))  # then the times below cover only the part after the restart
    started, cpu = time.perf_counter(), 0.0
    argv = [*run.argv, *device_options(device), *COMMON_RECIPE_ARGS, "--seed", str(run.seed), "--output_dir", str(out)]
    cpu += call_recipe(run.recipe, argv, threads=threads, in_process=in_process, log=log)
    metrics = {"eval": json.loads((out / "eval_results.json").read_text())}
    for key, extra in run.evaluations:
        eval_argv = [
            *extra,
            "--model_name_or_path",
            str(out),
            "--do_eval",
            *device_options(device),
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(out / f"eval-{key}"),
        ]
        cpu += call_recipe(run.recipe, eval_argv, threads=threads, in_process=in_process, log=log)
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
        "machine": machine(threads, device, args.jobs),
    }
    path = run.result_path(args.results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)  # atomic: a killed driver leaves no half-written result that would count as finished
    if not run.keep:
        shutil.rmtree(out, ignore_errors=True)
    return record


def trained_on(record: dict[str, Any]) -> str:
    """Where a recorded run trained, ``cpu`` or ``cuda`` (runs recorded before the runner noted it trained on the
    CPU)."""
    return record.get("machine", {}).get("device", "cpu")


def seconds_per_step(results_dir: Path, table: str) -> dict[str, float]:
    """Median CPU seconds per optimizer step of the finished runs of ``table`` anywhere under ``results_dir`` (the
    table's folder and shortened sizing runs in ``sizing/<table>``), by setting."""
    measured: dict[str, list[float]] = {}
    for path in sorted(results_dir.rglob("*.json")) if results_dir.is_dir() else []:
        record = json.loads(path.read_text())
        on_cpu = trained_on(record) == "cpu"  # a GPU run's CPU time is no estimate
        if record.get("table") == table and record.get("steps") and not record["resumed"] and on_cpu:
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


def claim_path(run: Run, checkpoint_dir: Path) -> Path:
    """``<checkpoint-dir>/<table>/<run>-<hash>.claim``, beside the run's checkpoint folder."""
    folder = run.checkpoint(checkpoint_dir)
    return folder.with_name(f"{folder.name}.claim")


def log_path(run: Run, checkpoint_dir: Path) -> Path:
    """``<checkpoint-dir>/<table>/<run>-<hash>.log``: the recipes' output of a run started with ``--jobs`` > 1."""
    folder = run.checkpoint(checkpoint_dir)
    return folder.with_name(f"{folder.name}.log")


def alive(holder: dict[str, Any]) -> bool:
    """Whether a claim's process may still run; a claim from another host counts as alive (its pid means nothing
    here: delete the claim file by hand if that driver is gone)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(holder["pid"], 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def claim(path: Path) -> dict[str, Any] | None:
    """Claim a run for this process: create the claim file ``path`` holding ``{"host", "pid"}``, exclusively.

    Returns None when the claim is ours, else the live holder's ``{"host", "pid"}``. The file is written aside and
    hard-linked into place (the link fails if ``path`` exists), so a reader never sees it half-written. A claim whose
    process is gone (same host, no such pid: a killed driver) is stale: it is renamed away — of two drivers that
    found it, only one rename succeeds — and claimed anew."""
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = path.with_name(f"{path.name}.{me['host']}.{me['pid']}")
    while True:
        mine.write_text(json.dumps(me))
        try:
            os.link(mine, path)
            return None
        except FileExistsError:
            pass
        finally:
            mine.unlink()
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # released since: try again
        except json.JSONDecodeError as error:  # the drivers link complete files only: this one is not theirs
            raise ValueError(f"{path} is not a claim (JSON with host and pid): {error}; delete it") from error
        if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or "host" not in holder:
            raise ValueError(f"{path} is not a claim (JSON with host and pid): {holder!r}; delete it")
        if alive(holder):
            return holder
        try:
            os.rename(path, mine)
        except FileNotFoundError:
            continue  # another driver took it over first
        if json.loads(mine.read_text()) != holder:  # a fresh claim made since it was read: put it back
            with contextlib.suppress(FileExistsError):
                os.link(mine, path)
            mine.unlink()
            continue
        mine.unlink()
        print(f"taking over {path} (pid {holder['pid']} is gone)", flush=True)


def take(run: Run, args: argparse.Namespace) -> Path | None:
    """Claim ``run`` right before it starts; its claim file, or None (with a printed line) when another live driver
    holds it or its result has appeared since the grid was read (another driver finished it)."""
    path = claim_path(run, args.checkpoint_dir)
    holder = claim(path)
    if holder is not None:
        print(f"skip {run.table}/{run.name} (claimed by pid {holder['pid']} on {holder['host']}: {path})", flush=True)
        return None
    if run.result_path(args.results_dir).is_file():
        path.unlink()
        print(f"skip {run.table}/{run.name} (done)", flush=True)
        return None
    return path


def missing_origin(run: Run, args: argparse.Namespace) -> str | None:
    """Why ``run`` cannot start yet: its origin's checkpoint is missing; None when it can (or has no origin)."""
    origin = run.requires
    if origin is None or (origin.checkpoint(args.checkpoint_dir) / "config.json").is_file():
        return None
    return (
        f"{run.name} starts from {origin.name}'s checkpoint, which is not in {args.checkpoint_dir}: "
        f"run it first (--only {origin.name})"
    )


def check_device(device: str) -> None:
    """Fail at start, not in the first recipe, when ``--device cuda`` has no GPU to use."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device cuda: torch {torch.__version__} sees no GPU here (torch.cuda.is_available() is False: a "
                "CPU-only torch build, no GPU or no driver); use --device cpu"
            )


def failure(error: BaseException, log: Path) -> str:
    """A failed run's error and the end of its log, for the driver's output."""
    if isinstance(error, subprocess.CalledProcessError):
        what = f"{Path(error.cmd[1]).relative_to(REPO)} exited with status {error.returncode}"
    else:
        what = f"{type(error).__name__}: {error}"
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
    return "\n    ".join([f"{what}; the end of its output ({log}):", *tail])


def run_concurrently(
    runs: Sequence[Run], args: argparse.Namespace, prepare: Callable[[argparse.Namespace], None] | None
) -> int:
    """Run ``runs`` not finished yet, up to ``args.jobs`` at once, each in its own recipe subprocesses with its
    output in :func:`log_path`; returns the exit status (1 if any run failed or could not start).

    Runs start in grid order as slots free up; a run with ``requires`` waits until its origin (when part of
    ``runs``) has finished, and is not run when the origin failed. A failed run does not stop the others."""
    waiting = []
    for run in runs:
        if run.result_path(args.results_dir).is_file():
            print(f"skip {run.table}/{run.name} (done)", flush=True)
        else:
            waiting.append(run)
    prepared = prepare is None
    failed: dict[str, str] = {}  # run name -> "failed" or "not run"
    active: dict[Future, tuple[Run, Path]] = {}  # running -> (run, its claim file)
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            while waiting or active:
                busy = {run.name for run in waiting} | {run.name for run, _ in active.values()}
                for run in list(waiting):
                    if len(active) == args.jobs:
                        break
                    origin = run.requires
                    if origin is not None and origin.name in busy:
                        continue  # starts once its origin has finished
                    waiting.remove(run)
                    problem = missing_origin(run, args)
                    if origin is not None and origin.name in failed:
                        problem = f"its origin {origin.name} did not finish"
                    if problem is not None:
                        failed[run.name] = "not run"
                        print(f"not run {run.table}/{run.name}: {problem}", flush=True)
                    elif (claimed := take(run, args)) is not None:
                        if not prepared:
                            try:
                                prepare(args)
                            except BaseException:
                                claimed.unlink(missing_ok=True)  # not started, not in active: release it here
                                raise
                            prepared = True
                        log = log_path(run, args.checkpoint_dir)
                        print(f"run {run.table}/{run.name} (output: {log})", flush=True)
                        active[pool.submit(execute, run, args, log)] = (run, claimed)
                finished, _ = wait(active, return_when=FIRST_COMPLETED)
                for future in finished:
                    run, claimed = active.pop(future)
                    claimed.unlink(missing_ok=True)
                    if future.exception() is None:
                        print(f"done {run.table}/{run.name}: {json.dumps(future.result()['metrics'])}", flush=True)
                        continue
                    failed[run.name] = "failed"
                    message = failure(future.exception(), log_path(run, args.checkpoint_dir))
                    print(f"FAILED {run.table}/{run.name}: {message}", flush=True)
    finally:  # after the pool has waited for the running recipes
        for _, claimed in active.values():
            claimed.unlink(missing_ok=True)
    if failed:
        listed = ", ".join(f"{name} ({why})" for name, why in failed.items())
        print(f"{len(failed)} of {len(runs)} runs did not finish: {listed}", flush=True)
        return 1
    return 0


def main(
    build: Callable[[argparse.Namespace], list[Run]],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse the options, build the grid, and list it (``--dry-run``) or run every run not finished yet: one at a time
    in grid order (``--jobs 1``: the first failure stops the driver) or ``--jobs`` at once
    (:func:`run_concurrently`); ``prepare`` (e.g. building a tokenizer) runs once before the first run that trains.
    Each run is claimed (:func:`claim`) right before it starts, so drivers sharing a folder never train the same
    run twice; a run another live driver holds is skipped."""
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1; got {args.threads}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
    if args.jobs > 1 and args.in_process:
        raise ValueError(
            f"--jobs {args.jobs} with --in-process: concurrent runs need a recipe subprocess each; drop --in-process "
            "or use --jobs 1"
        )
    runs = select(build(args), args.only)
    if not runs:
        raise ValueError(f"--only {args.only}: no run of the grid matches")
    if args.dry_run:  # trains nothing, so it needs no GPU
        print(dry_run(runs, args))
        return 0
    check_device(args.device)
    if args.jobs > 1:
        return run_concurrently(runs, args, prepare)
    finished = {run.name for run in runs if run.result_path(args.results_dir).is_file()}
    prepared = False
    for run in runs:
        if run.name in finished:
            print(f"skip {run.table}/{run.name} (done)", flush=True)
            continue
        problem = missing_origin(run, args)
        if problem is not None:
            raise FileNotFoundError(problem)
        claimed = take(run, args)
        if claimed is None:
            continue
        try:
            if prepare is not None and not prepared:
                prepare(args)
                prepared = True
            print(f"run {run.table}/{run.name}", flush=True)
            record = execute(run, args)
            print(f"done {run.table}/{run.name}: {json.dumps(record['metrics'])}", flush=True)
        finally:
            claimed.unlink(missing_ok=True)
    return 0
