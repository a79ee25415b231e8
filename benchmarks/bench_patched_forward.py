"""End-to-end time of the packaged all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden), unpatched vs patched.

Providers: ``sdpa`` (transformers' default, the baseline), ``eager`` (transformers' softmax), ``rsoftmax-none``
(patched, every rate None: transformers' SDPA through our attention function) and ``rsoftmax-<r>`` (patched, rate
``r`` in every layer; on CPU the reference r-softmax). Modes: ``fwd`` (under ``no_grad``) and ``fwdbwd`` (forward,
then the backward of a fixed random gradient of the last hidden state into every weight; eval mode, so no dropout).
Inputs: ``B`` sequences of ``T`` tokens, the second half of the batch padded by 25% (mixed padding), float32.

Timing: one call of every provider per round, rounds repeated (``--reps``, after two warm-up rounds), so that
load from other processes on a shared machine falls on all providers alike. Each record holds the wall-clock
median, p20 and p80 of the calls and ``median_cpu_ms``, the median CPU time of this process per call
(``time.process_time``: time the process was not running, e.g. preempted by another one, does not count).
``ratio_vs_baseline`` and ``cpu_ratio_vs_baseline`` are median / baseline median for each clock (the header
records the 1-minute load average before and after the run); ``goals`` checks issue 13's CPU goals (patched
r = 0.5: forward within 1.5x, forward + backward within 2x of the unpatched model). Peak memory: on CUDA,
``max_memory_allocated`` above the level before the call; on CPU, the peak of torch's own allocations during one
call from the profiler's memory events, at operator granularity (an upper bound, see :func:`peak_memory_mb`).

Writes ``benchmarks/results/patched_forward-<device>-<date>.json`` (schema of ``benchmarks/common.py``, plus
``median_cpu_ms``, the two ratios per record and the ``goals`` table) and prints the tables:

    OMP_NUM_THREADS=1 python -m benchmarks.bench_patched_forward                # B=8, T=128, both modes, 10 rounds
    OMP_NUM_THREADS=1 python -m benchmarks.bench_patched_forward --modes fwd --reps 5
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

import hf_sparse_attn
from benchmarks.common import QUANTILES, RESULTS_DIR, add_speedups, format_table, machine_info, write_results
from hf_sparse_attn.commands.packaged_model import verified_minilm_path

OP = "patched_forward"
MODES = ("fwd", "fwdbwd")
BASELINE = "sdpa"
#: (mode, limit on the patched model's median / baseline median): issue 13, item 8 (stated at r = 0.5)
GOALS = (("fwd", 1.5), ("fwdbwd", 2.0))


def build(model_path: str, provider: str, device: torch.device) -> torch.nn.Module:
    implementation = "eager" if provider == "eager" else "sdpa"
    model = transformers.AutoModel.from_pretrained(model_path, attn_implementation=implementation)
    model = model.to(device).eval()
    if provider.startswith("rsoftmax-"):
        rate = provider.removeprefix("rsoftmax-")
        hf_sparse_attn.patch_model(model, sparsity=None if rate == "none" else float(rate))
    return model


def call(model: torch.nn.Module, batch: dict[str, torch.Tensor], mode: str, grad: torch.Tensor) -> Callable[[], None]:
    """One timed call of ``model`` in ``mode``."""
    if mode == "fwd":

        def forward() -> None:
            with torch.no_grad():
                model(**batch)

        return forward

    def forward_backward() -> None:
        model(**batch).last_hidden_state.backward(grad)

    return forward_backward


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], model: torch.nn.Module, device: torch.device) -> tuple[float, float]:
    """``(wall ms, process CPU ms)`` of one call; gradients are cleared first, outside the timed region."""
    model.zero_grad(set_to_none=True)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def peak_memory_mb(fn: Callable[[], None], model: torch.nn.Module, device: torch.device) -> float:
    """Peak of the memory allocated during one call, above the level before it (see the module docstring)."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an operator's own net allocation counts from its start, its own net release (e.g. the tensors an autograd
    # Function frees between its child operators) from its end: an upper bound at operator granularity
    changes = []
    for event in prof.events():
        size = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        changes.append((event.time_range.start if size >= 0 else event.time_range.end, size))
    live = peak = 0
    for _, size in sorted(changes):
        live += size
        peak = max(peak, live)
    return peak / 2**20


def quantiles(times: list[float]) -> list[float]:
    """``[median, p20, p80]`` of ``times``, rounded to µs."""
    return [round(q, 3) for q in torch.tensor(times).quantile(torch.tensor(QUANTILES)).tolist()]


def goal_table(records: list[dict[str, Any]], provider: str) -> list[dict[str, Any]]:
    """Pass/fail of ``provider`` (the patched model) against :data:`GOALS`, for both clocks."""
    by_key = {(r["provider"], r["mode"]): r for r in records}
    goals = []
    for mode, limit in GOALS:
        record = by_key.get((provider, mode))
        if record is None:
            continue
        ratio, cpu_ratio = record["ratio_vs_baseline"], record["cpu_ratio_vs_baseline"]
        goals.append(
            {
                "goal": f"{provider} {mode} within {limit}x of {record['baseline']}",
                "limit": limit,
                "ratio": ratio,
                "cpu_ratio": cpu_ratio,
                "pass": ratio <= limit,
                "pass_cpu": cpu_ratio <= limit,
            }
        )
    return goals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=10, help="timed rounds (after two warm-up rounds)")
    parser.add_argument("--rate", type=float, default=0.5, help="the r-softmax rate of the patched model")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="B=2, T=16, for smoke runs")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.small:
        args.batch_size, args.seq_len = 2, 16
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]  # a shared machine: the load says how much to trust the wall-clock times
    device = torch.device(args.device)
    model_path = verified_minilm_path()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    padded = args.batch_size // 2
    attention_mask[args.batch_size - padded :, args.seq_len * 3 // 4 :] = 0  # the last rows padded by 25%
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    patched = f"rsoftmax-{args.rate:g}"
    providers = [BASELINE, "eager", "rsoftmax-none", patched]
    models = {provider: build(model_path, provider, device) for provider in providers}
    hidden = models[BASELINE].config.hidden_size
    grad = torch.randn(args.batch_size, args.seq_len, hidden, generator=generator).to(device)
    shape = {"B": args.batch_size, "T": args.seq_len, "padded_rows": padded, "model": "all-MiniLM-L6-v2"}

    records = []
    for mode in args.modes:
        calls = {provider: call(model, batch, mode, grad) for provider, model in models.items()}
        wall: dict[str, list[float]] = {provider: [] for provider in providers}
        cpu: dict[str, list[float]] = {provider: [] for provider in providers}
        for round_ in range(args.reps + 2):
            for provider in providers:
                wall_ms, cpu_ms = timed(calls[provider], models[provider], device)
                if round_ >= 2:  # two warm-up rounds
                    wall[provider].append(wall_ms)
                    cpu[provider].append(cpu_ms)
        for provider in providers:
            median, p20, p80 = quantiles(wall[provider])
            records.append(
                {
                    "provider": provider,
                    "mode": mode,
                    "shape": shape,
                    "dtype": "fp32",
                    "status": "ok",
                    "median_ms": median,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "median_cpu_ms": quantiles(cpu[provider])[0],
                    "peak_mem_mb": round(peak_memory_mb(calls[provider], models[provider], device), 2),
                }
            )
    add_speedups(records, BASELINE)
    baseline = {r["mode"]: r for r in records if r["provider"] == BASELINE}
    for r in records:
        r["ratio_vs_baseline"] = round(r["median_ms"] / baseline[r["mode"]]["median_ms"], 3)
        r["cpu_ratio_vs_baseline"] = round(r["median_cpu_ms"] / baseline[r["mode"]]["median_cpu_ms"], 3)

    load = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    header = machine_info(device) | {"threads": torch.get_num_threads(), "load_average_1min": load}
    header["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    goals = goal_table(records, patched)
    path = write_results(OP, header | {"goals": goals}, records, args.out_dir)
    print(format_table(header, records))
    print(f"{'provider':<16}{'mode':<8}{'median_cpu_ms':>14}{'ratio':>8}{'cpu_ratio':>11}")
    for r in records:
        print(
            f"{r['provider']:<16}{r['mode']:<8}{r['median_cpu_ms']:>14.1f}"
            f"{r['ratio_vs_baseline']:>8.2f}{r['cpu_ratio_vs_baseline']:>11.2f}"
        )
    for goal in goals:
        verdict = "PASS" if goal["pass"] else "FAIL"
        print(f"{verdict}  {goal['goal']}: {goal['ratio']:.2f}x wall, {goal['cpu_ratio']:.2f}x CPU time")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
