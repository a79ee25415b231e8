"""Speed and memory of the LM-head losses: plain and fused softmax cross-entropy against our heads (DESIGN §4).

Scaffold for the fused LM-head kernels (not written yet): it measures the baselines and the reference heads,
so the fused versions have numbers to beat. Providers: ``linear_ce`` (``F.cross_entropy(h W^T + b, y)``, the
baseline), ``liger_flce`` (Liger's fused linear cross-entropy, if ``liger-kernel`` is installed, CUDA only) and
the reference heads ``sigsoftmax``, ``mos``, ``moss``, ``plif`` (``hf_sparse_attn.heads.build_head`` on the same
linear layer, loss ``F.nll_loss`` of the log-probabilities they return).

Run on a GPU (T=8192 tokens, d=768, V=50257 as in DESIGN §4)::

    python -m benchmarks.bench_lm_head
    python -m benchmarks.bench_lm_head --providers linear_ce liger_flce sigsoftmax --tokens 4096 8192

Smoke run on CPU::

    python -m benchmarks.bench_lm_head --device cpu --small
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
from hf_sparse_attn.heads import build_head

OP = "lm_head"
HEADS = ("sigsoftmax", "mos", "moss", "plif")
PROVIDERS = ("linear_ce", "liger_flce", *HEADS)
BASELINE = "linear_ce"


@dataclass
class Inputs:
    """Hidden states ``[T, d]`` (requiring grad), labels ``[T]`` and the output layer ``d -> V``."""

    hidden: torch.Tensor
    labels: torch.Tensor
    linear: nn.Linear
    num_mixtures: int


def setup(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, num_mixtures: int) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(0)
    tokens, hidden_size, vocab = shape["T"], shape["d"], shape["V"]
    hidden = torch.randn(tokens, hidden_size, generator=generator, device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator, device=device)
    linear = nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
    return Inputs(hidden, labels, linear, num_mixtures)


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
    head = build_head(provider, inputs.linear, num_mixtures=inputs.num_mixtures).to(inputs.hidden.device)
    return (lambda: F.nll_loss(head(inputs.hidden), inputs.labels)), [inputs.hidden, *head.parameters()]


def unavailable(provider: str, device: torch.device) -> str | None:
    if provider == "liger_flce":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed"
        if device.type != "cuda":
            return "needs CUDA"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=MODES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[8192])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--num-mixtures", type=int, default=4, help="K for mos / moss")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes (T=64, d=32, V=99) for smoke runs")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions on CPU (CUDA uses do_bench)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes or (["fp32"] if args.device == "cpu" else ["bf16"])
    if args.small:
        args.tokens, args.hidden_size, args.vocab, args.num_mixtures = [64], 32, 99, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    providers = available_providers(args.providers, BASELINE, unavailable, device)
    cases = [
        ({"T": tokens, "d": args.hidden_size, "V": args.vocab}, dtype)
        for tokens in args.tokens
        for dtype in args.dtypes
    ]
    header = machine_info(device)
    print(header)
    records = run_grid(
        providers,
        cases,
        args.modes,
        lambda shape, dtype: setup(shape, dtype, device, args.num_mixtures),
        build,
        device,
        args.reps,
    )
    add_speedups(records, BASELINE)
    header["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_results(OP, header, records, args.out_dir)
    print(format_table(header, records))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
