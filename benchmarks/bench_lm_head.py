"""Speed and memory of the LM-head losses: today's (unfused) heads against the fused, chunked head losses.

Providers, each giving the mean NLL of random labels from hidden states ``[T, d]`` and the output layer ``d -> V``
(no bias, as GPT-2's tied ``lm_head``):

- ``linear_ce``: ``F.cross_entropy(h W^T, y)``, today's plain softmax (the baseline of ``speedup_vs_baseline``);
- ``liger_flce``: Liger's fused linear cross-entropy, the softmax anchor (``liger-kernel``, CUDA only);
- ``sigsoftmax``, ``mos``, ``moss``, ``plif``: today's heads (``hf_sparse_attn.heads.build_head``), loss
  ``F.cross_entropy`` of the `[T, V]` log-probabilities they return;
- ``fused_softmax``, ``fused_sigsoftmax``, ``fused_mos``, ``fused_moss``, ``fused_plif``: the same heads through
  ``hf_sparse_attn.fused_loss.head_nll`` (the fused, chunked loss: no `[T, V]` tensor).

Each record of a fused provider names its unfused twin (``unfused``) and gives ``time_vs_unfused`` (median wall
time ratio, fused / unfused), ``cpu_time_vs_unfused`` (process CPU time; on CPU), ``peak_vs_unfused`` (profiler
peak ratio) and ``peak_rss_vs_unfused`` (RSS high-water-mark ratio, Linux CPU runs: a cross-check that also sees
what the profiler may miss, and memory the C allocator caches). On CPU the providers run interleaved (one run
of each in turn per repetition) after one profiled run each, whose ``torch.profiler`` memory events give
``peak_mem_mb`` (the peak of the bytes allocated during forward + backward, above what existed before); ``cpu_ms``
is the median process CPU time. On CUDA, ``triton.testing.do_bench`` and the allocator's peak. A case is one
(T, K) pair; providers that do not depend on K run only for the first K. ``--max-tokens PROVIDER=T`` skips a
provider above T tokens (recorded as ``status: "skipped"``), to keep the unfused heads' `[T, V]` tensors in RAM.

Run on a GPU (T=8192 tokens, d=768, V=50257 as in DESIGN §4)::

    python -m benchmarks.bench_lm_head

On CPU, the issue-14 grid (one thread)::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_lm_head --device cpu --tokens 1024 4096 16384 --reps 1 \\
        --max-tokens linear_ce=4096 sigsoftmax=4096 mos=4096 moss=4096 plif=4096

Smoke run on CPU::

    python -m benchmarks.bench_lm_head --device cpu --small
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import (
    DTYPES,
    MODES,
    RESULTS_DIR,
    add_speedups,
    available_providers,
    format_table,
    machine_info,
    measure,
    record,
    timed_callable,
    write_results,
)
from hf_sparse_attn.fused_loss import head_nll
from hf_sparse_attn.heads import build_head

OP = "lm_head"
HEADS = ("sigsoftmax", "mos", "moss", "plif")
FUSED = tuple(f"fused_{name}" for name in ("softmax", *HEADS))
PROVIDERS = ("linear_ce", "liger_flce", *HEADS, *FUSED)
BASELINE = "linear_ce"
#: fused provider -> today's unfused provider for the same head
UNFUSED = {"fused_softmax": "linear_ce", **{f"fused_{name}": name for name in HEADS}}
#: providers whose cost depends on K
MIXTURES = ("mos", "moss", "fused_mos", "fused_moss")


@dataclass
class Inputs:
    """Hidden states ``[T, d]`` (requiring grad), labels ``[T]`` and the output layer ``d -> V``."""

    hidden: torch.Tensor
    labels: torch.Tensor
    linear: nn.Linear
    num_mixtures: int


def setup(shape: dict[str, Any], dtype: torch.dtype, device: torch.device) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, hidden_size, vocab = shape["T"], shape["d"], shape["V"]
    hidden = torch.randn(tokens, hidden_size, generator=generator, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    linear = nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
    return Inputs(hidden, labels, linear, shape["K"])


def _liger(inputs: Inputs) -> Callable[[], torch.Tensor]:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda: loss(inputs.linear.weight, inputs.hidden, inputs.labels)


def build(provider: str, inputs: Inputs) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
    """The provider's loss as a callable, and the leaves its backward fills (hidden states and parameters)."""
    if provider == "linear_ce":
        forward = lambda: F.cross_entropy(inputs.linear(inputs.hidden).float(), inputs.labels)  # noqa: E731
        return forward, [inputs.hidden, inputs.linear.weight]
    if provider == "liger_flce":
        return _liger(inputs), [inputs.hidden, inputs.linear.weight]
    name = provider.removeprefix("fused_")
    head = build_head(name, inputs.linear, num_mixtures=inputs.num_mixtures).to(inputs.hidden.device)
    if provider.startswith("fused_"):
        forward = lambda: head_nll(head, inputs.hidden, inputs.labels)  # noqa: E731
    else:
        forward = lambda: F.cross_entropy(head(inputs.hidden), inputs.labels)  # noqa: E731
    return forward, [inputs.hidden, *head.parameters()]


def unavailable(provider: str, device: torch.device) -> str | None:
    if provider == "liger_flce":
        if device.type != "cuda":
            return "needs CUDA (Liger's fused linear cross-entropy is a Triton GPU kernel)"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
    return None


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field))
    except (OSError, StopIteration):
        return None


def _track_allocations_in_rss() -> None:
    """glibc: serve every allocation of 1 MiB or more by mmap, returned to the OS on free, so that the RSS
    high-water mark follows the live tensors instead of a heap that keeps freed chunks (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _profiled_run(fn: Callable[[], object], leaves: list[torch.Tensor]) -> tuple[float, float | None, float, float]:
    """(peak MB allocated while ``fn`` runs per torch.profiler, peak RSS growth in MB (Linux; the process's
    high-water mark reset first), wall ms, process CPU ms) from one run. The RSS figure is a cross-check: it also
    counts memory the C allocator keeps cached, so it is an upper bound."""
    for leaf in leaves:
        leaf.grad = None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc: return cached free memory, so reuse cannot hide growth
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS
        rss_before = _rss_mb("VmRSS")
    except (OSError, AttributeError):  # not Linux with glibc
        rss_before = None
    wall, cpu = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    wall, cpu = (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3
    rss_peak = None if rss_before is None else _rss_mb("VmHWM") - rss_before
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20, rss_peak, wall, cpu


def _quantiles(values: list[float]) -> list[float]:
    return (
        torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    )


def measure_cpu(timed: dict[str, tuple[Callable[[], object], list[torch.Tensor]]], reps: int) -> dict[str, dict]:
    """One profiled run per provider (memory), then ``reps`` interleaved timed runs (one of each in turn)."""
    results = {}
    for provider, (fn, leaves) in timed.items():
        peak, rss, wall, cpu = _profiled_run(fn, leaves)
        results[provider] = {
            "peak": peak,
            "rss": rss,
            "wall": [wall] if reps == 0 else [],
            "cpu": [cpu] if reps == 0 else [],
        }
        print(f"  {provider:>16} profiled: {peak:.1f} MB (RSS +{rss} MB), {wall:.0f} ms, CPU {cpu:.0f} ms", flush=True)
    for _ in range(reps):
        for provider, (fn, leaves) in timed.items():
            for leaf in leaves:
                leaf.grad = None
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            results[provider]["wall"].append((time.perf_counter() - wall) * 1e3)
            results[provider]["cpu"].append((time.process_time() - cpu) * 1e3)
    return results


def run_case(
    providers: list[str], shape: dict[str, Any], dtype: str, modes: list[str], device: torch.device, reps: int
) -> list[dict[str, Any]]:
    inputs = setup(shape, DTYPES[dtype], device)
    records = []
    for mode in modes:
        timed = {}
        for provider in providers:
            forward, leaves = build(provider, inputs)
            grad = None if mode == "fwd" else torch.ones_like(forward())
            timed[provider] = (timed_callable(forward, mode, grad), leaves)
        if device.type == "cuda":
            measured = {p: measure(fn, leaves, device, reps) for p, (fn, leaves) in timed.items()}
            for provider, (times, peak) in measured.items():
                records.append(record(provider, mode, shape, dtype, times, peak))
        else:
            for provider, result in measure_cpu(timed, reps).items():
                entry = record(provider, mode, shape, dtype, _quantiles(result["wall"]), result["peak"])
                entry["cpu_ms"] = round(_quantiles(result["cpu"])[0], 4)
                entry["peak_rss_mb"] = None if result["rss"] is None else round(result["rss"], 2)
                records.append(entry)
        timed.clear()
    return records


def add_unfused_ratios(records: list[dict[str, Any]]) -> None:
    """``unfused``, ``time_vs_unfused`` and ``peak_vs_unfused`` on every fused record (None where the unfused twin
    did not run on that case)."""
    key = lambda r: (r["mode"], r["shape"]["T"], r["shape"]["K"], r["dtype"])  # noqa: E731
    by_case = {(r["provider"], *key(r)): r for r in records}
    for entry in records:
        if entry["provider"] not in UNFUSED:
            continue
        twin = by_case.get((UNFUSED[entry["provider"]], *key(entry)))
        if twin is None and UNFUSED[entry["provider"]] not in MIXTURES:  # K-independent twin: its first-K case
            twin = next((r for r in records if r["provider"] == UNFUSED[entry["provider"]]
                         and key(r)[:2] == key(entry)[:2] and key(r)[3] == key(entry)[3]), None)  # fmt: skip
        entry["unfused"] = UNFUSED[entry["provider"]]
        ok = twin is not None and twin["status"] == "ok" and entry["status"] == "ok"
        entry["time_vs_unfused"] = round(entry["median_ms"] / twin["median_ms"], 3) if ok else None
        both_cpu = ok and entry.get("cpu_ms") and twin.get("cpu_ms")
        entry["cpu_time_vs_unfused"] = round(entry["cpu_ms"] / twin["cpu_ms"], 3) if both_cpu else None
        for key_mb, key_ratio in (("peak_mem_mb", "peak_vs_unfused"), ("peak_rss_mb", "peak_rss_vs_unfused")):
            both = ok and entry.get(key_mb) is not None and twin.get(key_mb)
            entry[key_ratio] = round(entry[key_mb] / twin[key_mb], 4) if both else None


def _pairs(providers: list[str]) -> list[list[str]]:
    """``providers`` in groups that run together: each fused provider with its unfused twin, the rest alone
    (the baseline first)."""
    groups, placed = [], set()
    for provider in providers:
        if provider in placed:
            continue
        twin = UNFUSED.get(provider) or next((f for f, u in UNFUSED.items() if u == provider), None)
        group = [p for p in providers if p in (provider, twin)]
        group.sort(key=lambda p: p in UNFUSED)  # unfused first
        groups.append(group)
        placed.update(group)
    return groups


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["fwdbwd"], choices=MODES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--num-mixtures", nargs="+", type=int, default=[4], help="K for mos / moss (first: default)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (T=64, d=32, V=99) for smoke runs")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument(
        "--max-tokens", nargs="+", default=[], metavar="PROVIDER=T", help="skip PROVIDER on cases above T tokens"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="suffix of the results file name (lm_head-NAME-<device>-<date>.json)")
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or (["fp32"] if args.device == "cpu" else ["bf16"])
    if args.small:
        args.tokens, args.hidden_size, args.vocab, args.num_mixtures = [64], 32, 99, [2]
    try:
        args.max_tokens = {p: int(t) for p, t in (item.split("=") for item in args.max_tokens)}
    except ValueError as error:
        parser.error(f"--max-tokens takes PROVIDER=T pairs: {error}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        _track_allocations_in_rss()
    providers = available_providers(args.providers, BASELINE, unavailable, device)
    header = machine_info(device)
    header["threads"] = torch.get_num_threads()
    requested = dict.fromkeys(["liger_flce", *args.providers])  # Liger's status is always recorded: the anchor
    header["not_run"] = {p: unavailable(p, device) for p in requested if unavailable(p, device)}
    print(header)
    records: list[dict[str, Any]] = []
    for tokens in args.tokens:
        for index, num_mixtures in enumerate(args.num_mixtures):
            shape = {"T": tokens, "d": args.hidden_size, "V": args.vocab, "K": num_mixtures}
            chosen = [p for p in providers if index == 0 or p in MIXTURES]
            running = [p for p in chosen if tokens <= args.max_tokens.get(p, tokens)]
            for dtype in args.dtypes:
                for provider in sorted(set(chosen) - set(running)):
                    for mode in args.modes:
                        entry = record(provider, mode, shape, dtype, None, None)
                        entry["status"] = f"skipped: above --max-tokens {args.max_tokens[provider]}"
                        records.append(entry)
                for group in _pairs(running):  # each head's unfused and fused losses side by side
                    print(f"T={tokens} K={num_mixtures} {dtype}: {', '.join(group)}", flush=True)
                    records += run_case(group, shape, dtype, args.modes, device, args.reps)
                    add_speedups(records, BASELINE)
                    add_unfused_ratios(records)
                    header["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
                    # after every group, so that a partial run still leaves its results
                    path = write_results(f"{OP}-{args.name}" if args.name else OP, header, records, args.out_dir)
    print(format_table(header, records))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
