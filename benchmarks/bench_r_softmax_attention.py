"""Speed and memory of r-softmax attention against softmax and sparse-attention baselines (DESIGN §4).

Providers (STYLE §6): ``sdpa`` (``F.scaled_dot_product_attention``, the baseline), ``eager_softmax`` (matmul,
masked softmax, matmul), ``reference`` (the dispatcher's reference path: ``hf_sparse_attn.ops.r_softmax`` on the
materialised scores), ``triton`` (our flash-style kernel, ``RSoftmaxAttentionFunction``, called directly),
``dispatch`` (``hf_sparse_attn.kernels.r_softmax_attention`` with the mask given as key padding and causal offset,
as the patched models call it: the kernel on CUDA after its self-check, dispatcher costs included), ``entmax`` (eager
entmax-1.5 from the ``entmax`` package) and ``adasplash`` (AdaSplash's Triton entmax-1.5, if installed; its version
and path go into the JSON header). Masks: ``none`` (SDPA keeps its flash backend), ``padded`` (non-causal, batch
row b keeps a deterministic length in [N/2, N]) and ``causal``. Modes: ``infer`` (forward under ``no_grad``),
``fwd``, ``bwd``, ``fwdbwd``. Rates: 0.25, 0.5, 0.9.

The JSON header holds a goal table (issue 13: forward+backward within 2x SDPA, inference forward within 1.5x,
peak memory within 1.2x SDPA's, faster than AdaSplash), one line per case, also printed.

Run on a GPU (writes ``benchmarks/results/r_softmax_attention-<device>-<date>.json`` and prints a table)::

    python -m benchmarks.bench_r_softmax_attention                       # B=8, H=12, D=64, N=512..8192, bf16
    python -m benchmarks.bench_r_softmax_attention --lengths 1024 4096 --modes fwdbwd --providers sdpa triton

Smoke run on CPU (tiny shapes, no Triton needed)::

    python -m benchmarks.bench_r_softmax_attention --device cpu --small --providers sdpa eager_softmax reference
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    MODES,
    RESULTS_DIR,
    add_speedups,
    available_providers,
    format_table,
    machine_info,
    run_grid,
    write_results,
)
from hf_sparse_attn.kernels import r_softmax_attention

OP = "r_softmax_attention"
PROVIDERS = ("sdpa", "eager_softmax", "reference", "triton", "dispatch", "entmax", "adasplash")
BASELINE = "sdpa"
MASKS = ("none", "padded", "causal")
RATES = (0.25, 0.5, 0.9)
#: issue 13 goals for the kernel against SDPA: (mode, what, bound)
GOALS = (("fwdbwd", "time", 2.0), ("infer", "time", 1.5), ("fwdbwd", "memory", 1.2))


@dataclass
class Inputs:
    """One case's tensors, shared by every provider: q, k, v ``[B, H, N, D]`` (requiring grad), the key lengths
    ``[B]``, the key padding ``[B, N]`` (None unless padded) and the bool mask ``[B, 1, 1 or N, N]`` (None for
    ``none``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    key_padding: torch.Tensor | None
    mask: torch.Tensor | None
    causal: bool
    rate: float


def setup(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, rate: float) -> Inputs:
    batch, heads, length, head_dim = shape["B"], shape["H"], shape["N"], shape["D"]
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, head_dim, generator=generator, device=device, dtype=dtype).requires_grad_()
        for _ in range(3)
    )
    causal = shape["mask"] == "causal"
    lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
    key_padding = mask = None
    if causal:
        rows = torch.arange(length, device=device)
        mask = (rows[None, :] <= rows[:, None])[None, None]  # (1, 1, N, N)
    elif shape["mask"] == "padded":  # lengths spread evenly over [N/2, N]
        lengths = torch.linspace(length // 2, length, batch, device=device).round().to(torch.int32)
        key_padding = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, N)
        mask = key_padding[:, None, None, :]  # (B, 1, 1, N)
    return Inputs(q, k, v, lengths, key_padding, mask, causal, rate)


def _eager_scores(inputs: Inputs) -> torch.Tensor:
    scores = inputs.q @ inputs.k.transpose(-1, -2) * inputs.q.shape[-1] ** -0.5  # (B, H, N, N)
    return scores if inputs.mask is None else scores.masked_fill(~inputs.mask, float("-inf"))


def _entmax(inputs: Inputs) -> torch.Tensor:
    from entmax import entmax15

    return entmax15(_eager_scores(inputs).float(), dim=-1).to(inputs.v.dtype) @ inputs.v


def _adasplash(inputs: Inputs) -> torch.Tensor:
    from adasplash import adasplash

    varlen = inputs.lengths if inputs.key_padding is not None else None
    return adasplash(inputs.q, inputs.k, inputs.v, alpha=1.5, is_causal=inputs.causal, varlen=varlen)


def _triton(inputs: Inputs) -> torch.Tensor:
    from hf_sparse_attn.kernels.r_softmax_attention_triton import RSoftmaxAttentionFunction

    heads = inputs.q.shape[1]
    rate = torch.full((heads,), inputs.rate, device=inputs.q.device)
    scale = inputs.q.shape[-1] ** -0.5
    return RSoftmaxAttentionFunction.apply(
        inputs.q, inputs.k, inputs.v, inputs.key_padding, rate, inputs.causal, scale, 1e-8
    )


FORWARDS: dict[str, Callable[[Inputs], torch.Tensor]] = {
    "sdpa": lambda x: F.scaled_dot_product_attention(
        x.q, x.k, x.v, attn_mask=None if x.causal else x.mask, is_causal=x.causal
    ),
    "eager_softmax": lambda x: torch.softmax(_eager_scores(x), dim=-1) @ x.v,
    "reference": lambda x: r_softmax_attention(x.q, x.k, x.v, x.mask, x.rate, backend="reference")[0],
    "triton": _triton,
    "dispatch": lambda x: r_softmax_attention(  # as the model calls it: T = S, causal offset 0
        x.q, x.k, x.v, None, x.rate, key_padding=x.key_padding, causal_offset=0 if x.causal else None
    )[0],
    "entmax": _entmax,
    "adasplash": _adasplash,
}


def unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here, or None."""
    package = {"triton": "triton", "entmax": "entmax", "adasplash": "adasplash"}.get(provider)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    if provider in ("triton", "adasplash") and device.type != "cuda":
        return "needs CUDA"
    return None


def check_agreement(inputs: Inputs, providers: list[str]) -> None:
    """Our kernel must match the reference, output and q/k/v gradients, before it is timed (fp32 accumulation;
    bf16/fp16 tolerance relative to each tensor's largest entry)."""
    if not {"triton", "reference"} <= set(providers):
        return
    leaves = [inputs.q, inputs.k, inputs.v]
    try:
        expected = FORWARDS["reference"](inputs)
        grad = torch.randn_like(expected)
        expected_all = [expected, *torch.autograd.grad(expected, leaves, grad)]
    except torch.OutOfMemoryError:
        return
    actual = FORWARDS["triton"](inputs)
    actual_all = [actual, *torch.autograd.grad(actual, leaves, grad)]
    tolerance = 1e-4 if inputs.q.dtype == torch.float32 else 5e-2
    for name, got, wanted in zip(("output", "dq", "dk", "dv"), actual_all, expected_all, strict=True):
        error = (got.float() - wanted.float()).abs().max().item()
        if not error <= tolerance * max(1.0, wanted.float().abs().max().item()):
            raise AssertionError(f"triton {name} differs from reference by {error:.3e} at {tuple(inputs.q.shape)}")


def goal_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (goal, case): the kernel's time or peak memory over SDPA's (or AdaSplash's time over ours)."""
    by_key = {(r["provider"], r["mode"], json.dumps(r["shape"], sort_keys=True), r["dtype"]): r for r in records}
    lines = []
    for (provider, mode, shape, dtype), record in by_key.items():
        if provider != "triton" or record["median_ms"] is None:
            continue
        sdpa = by_key.get(("sdpa", mode, shape, dtype))
        for goal_mode, what, bound in GOALS:
            key = "median_ms" if what == "time" else "peak_mem_mb"
            if goal_mode != mode or sdpa is None or not sdpa[key] or record[key] is None:
                continue
            ratio = record[key] / sdpa[key]
            goal = f"{what} vs sdpa ({mode}) <= {bound:g}x"
            lines.append({"goal": goal, "shape": json.loads(shape), "dtype": dtype, "ratio": round(ratio, 3),
                          "met": ratio <= bound})  # fmt: skip
        adasplash = by_key.get(("adasplash", mode, shape, dtype))
        if mode == "fwdbwd" and adasplash is not None and adasplash["median_ms"]:
            ratio = record["median_ms"] / adasplash["median_ms"]
            lines.append({"goal": "time vs adasplash (fwdbwd) < 1x", "shape": json.loads(shape), "dtype": dtype,
                          "ratio": round(ratio, 3), "met": ratio < 1.0})  # fmt: skip
    return lines


def adasplash_info() -> dict[str, str] | None:
    """AdaSplash's version and install path, or None when it is not installed."""
    spec = importlib.util.find_spec("adasplash")
    if spec is None:
        return None
    try:
        version = importlib.metadata.version("adasplash")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "path": str(Path(spec.origin).parent)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["infer", "fwdbwd"], choices=MODES)
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--lengths", nargs="+", type=int, help="sequence lengths N (default 512 ... 8192)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES), help="r-softmax sparsity rates")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (B=2, H=2, D=16; N=32, 64) for smoke runs")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or (["fp32"] if args.device == "cpu" else ["bf16"])
    if args.small:
        args.batch, args.heads, args.head_dim = 2, 2, 16
    args.lengths = args.lengths or ([32, 64] if args.small else [512, 1024, 2048, 4096, 8192])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    providers = available_providers(args.providers, BASELINE, unavailable, device)
    cases = [
        ({"B": args.batch, "H": args.heads, "N": n, "D": args.head_dim, "mask": mask, "r": rate}, dtype)
        for mask in args.masks
        for n in args.lengths
        for rate in args.rates
        for dtype in args.dtypes
    ]

    def setup_case(shape: dict[str, Any], dtype: torch.dtype) -> Inputs:
        inputs = setup(shape, dtype, device, shape["r"])
        check_agreement(inputs, providers)
        return inputs

    def build(provider: str, inputs: Inputs) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
        return (lambda: FORWARDS[provider](inputs)), [inputs.q, inputs.k, inputs.v]

    header = machine_info(device)
    print(header)
    records = run_grid(providers, cases, args.modes, setup_case, build, device, args.reps)
    add_speedups(records, BASELINE)
    header["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    header["adasplash"] = adasplash_info()
    header["goals"] = goal_table(records)
    path = write_results(OP, header, records, args.out_dir)
    print(format_table(header, records))
    for line in header["goals"]:
        shape = "-".join(str(v) if isinstance(v, str) else f"{k}{v}" for k, v in line["shape"].items())
        verdict = "PASS" if line["met"] else "FAIL"
        print(f"goal {line['goal']:<32} {shape:<36} {line['dtype']}: {line['ratio']:.2f} {verdict}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
