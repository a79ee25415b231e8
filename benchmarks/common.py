"""Shared benchmark machinery (STYLE §6): timing, peak memory, the JSON results file and the printed table.

Every ``bench_<op>.py`` builds its inputs once per shape (outside the timed region), times each provider in the
modes ``fwd`` (forward with autograd recording), ``bwd`` (backward of a recorded forward), ``fwdbwd`` and
``infer`` (forward under ``torch.no_grad``), and
writes ``benchmarks/results/<op>-<device>-<date>.json``: a machine header (device, torch, triton, transformers,
hf_sparse_attn, git_commit, timestamp) and one record per (provider, mode, shape, dtype) with ``median_ms``,
``p20_ms``, ``p80_ms``, ``peak_mem_mb``, ``baseline`` and ``speedup_vs_baseline`` (baseline median / median,
the baseline measured in the same run). A provider that runs out of memory gets ``status: "oom"`` and nulls.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
MODES = ("fwd", "bwd", "fwdbwd", "infer")  # infer: the forward under torch.no_grad()
QUANTILES = (0.5, 0.2, 0.8)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or device.type


def machine_info(device: torch.device) -> dict[str, Any]:
    """The header of a results file."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "hf_sparse_attn": _version("hf-sparse-attn"),
        "git_commit": commit,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def timed_callable(forward: Callable[[], torch.Tensor], mode: str, grad: torch.Tensor | None) -> Callable[[], object]:
    """What is timed in ``mode``; for ``bwd`` the forward runs here, once, outside the timed region."""
    if mode == "fwd":
        return forward
    if mode == "infer":
        return torch.no_grad()(forward)
    if mode == "fwdbwd":
        return lambda: forward().backward(grad)
    out = forward()
    return lambda: out.backward(grad, retain_graph=True)


def _cpu_quantiles(fn: Callable[[], object], leaves: list[torch.Tensor], reps: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return torch.tensor(times).quantile(torch.tensor(QUANTILES)).tolist()


def measure(
    fn: Callable[[], object], leaves: list[torch.Tensor], device: torch.device, reps: int
) -> tuple[list[float], float | None]:
    """``([median, p20, p80] ms, peak memory in MB above what was allocated before, or None on CPU)``.

    CUDA times come from ``triton.testing.do_bench`` (warm-up first, gradients of ``leaves`` reset between runs);
    CPU times from a plain timer over ``reps`` runs."""
    if device.type != "cuda":
        return _cpu_quantiles(fn, leaves, reps), None
    from triton.testing import do_bench

    fn()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    times = do_bench(fn, quantiles=list(QUANTILES), grad_to_none=leaves)
    return list(times), peak


def available_providers(
    requested: list[str], baseline: str, unavailable: Callable[[str, torch.device], str | None], device: torch.device
) -> list[str]:
    """``baseline`` first, then the requested providers that can run on ``device`` (the others are reported)."""
    providers = []
    for provider in [baseline] + [p for p in requested if p != baseline]:
        reason = unavailable(provider, device)
        if reason:
            print(f"skipping {provider}: {reason}")
        else:
            providers.append(provider)
    return providers


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def add_speedups(records: list[dict[str, Any]], baseline: str) -> None:
    """Fill ``baseline`` and ``speedup_vs_baseline`` (baseline median / median) for each (mode, shape, dtype)."""
    medians = {
        (r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"]): r["median_ms"]
        for r in records
        if r["provider"] == baseline
    }
    for record in records:
        reference = medians.get((record["mode"], json.dumps(record["shape"], sort_keys=True), record["dtype"]))
        record["baseline"] = baseline
        both = reference is not None and record["median_ms"] is not None
        record["speedup_vs_baseline"] = round(reference / record["median_ms"], 3) if both else None


def write_results(op: str, header: dict[str, Any], records: list[dict[str, Any]], out_dir: Path) -> Path:
    """``<out_dir>/<op>-<device>-<date>.json``; returns the path."""
    slug = re.sub(r"[^a-z0-9]+", "-", header["device"].lower()).strip("-") or "unknown"
    path = Path(out_dir) / f"{op}-{slug}-{header['timestamp'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, "records": records}, indent=2) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_table(header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """A fixed-width table of the records with the machine line above it."""
    machine = (
        f"{header['device']} | torch {header['torch']} | triton {header['triton']} | "
        f"transformers {header['transformers']} | commit {(header['git_commit'] or '-')[:10]}"
    )
    columns = ("provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup")
    rows = [
        [
            r["provider"],
            r["mode"],
            "-".join(str(v) if isinstance(v, str) else f"{k}{v}" for k, v in r["shape"].items()),
            r["dtype"],
            *(_cell(r[key]) for key in ("median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "speedup_vs_baseline")),
        ]
        for r in records
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(columns, *rows, strict=False)]
    lines = [machine, "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def record(
    provider: str, mode: str, shape: dict[str, Any], dtype: str, times: list[float] | None, peak: float | None
) -> dict[str, Any]:
    median, p20, p80 = (round(t, 4) for t in times) if times else (None, None, None)
    return {
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "dtype": dtype,
        "status": "ok" if times else "oom",
        "median_ms": median,
        "p20_ms": p20,
        "p80_ms": p80,
        "peak_mem_mb": None if peak is None else round(peak, 2),
    }


def run_grid(
    providers: list[str],
    cases: list[tuple[dict[str, Any], str]],
    modes: list[str],
    setup: Callable[[dict[str, Any], torch.dtype], Any],
    build: Callable[[str, Any], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]],
    device: torch.device,
    reps: int,
) -> list[dict[str, Any]]:
    """Time every provider in every mode on every (shape, dtype) case.

    ``setup(shape, dtype)`` builds the inputs once per case; ``build(provider, inputs)`` returns the provider's
    forward callable and the leaf tensors whose gradients the backward fills."""
    records = []
    for shape, dtype in cases:
        inputs = setup(shape, DTYPES[dtype])
        for provider in providers:
            for mode in modes:
                try:
                    forward, leaves = build(provider, inputs)
                    grad = None if mode in ("fwd", "infer") else torch.randn_like(forward())
                    times, peak = measure(timed_callable(forward, mode, grad), leaves, device, reps)
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    if not is_oom(error):
                        raise
                    times, peak = None, None
                finally:
                    grad = forward = leaves = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                records.append(record(provider, mode, shape, dtype, times, peak))
                print(f"  {provider:>14} {mode:>6} {shape} {dtype}: {records[-1]['median_ms']} ms", flush=True)
        del inputs
    return records
