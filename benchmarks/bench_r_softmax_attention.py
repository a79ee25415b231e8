"""Speed and memory of r-softmax attention against softmax and sparse-attention baselines (DESIGN §4).

Providers (STYLE §6): ``sdpa`` (``F.scaled_dot_product_attention``, the baseline), ``eager_softmax`` (matmul,
masked softmax, matmul), ``reference`` (the dispatcher's reference path: ``hf_sparse_attn.ops.r_softmax`` on the
materialised scores), ``triton`` (our flash-style kernel, ``RSoftmaxAttentionFunction``), ``entmax`` (eager
entmax-1.5 from the ``entmax`` package) and ``adasplash`` (AdaSplash's Triton entmax-1.5, if installed).
Masks: ``causal`` and ``padded`` (non-causal, batch row b keeps a deterministic length in [N/2, N]).

Run on a GPU (writes ``benchmarks/results/r_softmax_attention-<device>-<date>.json`` and prints a table)::

    python -m benchmarks.bench_r_softmax_attention                       # B=8, H=12, D=64, N=512..8192, bf16
    python -m benchmarks.bench_r_softmax_attention --lengths 1024 4096 --modes fwdbwd --providers sdpa triton

Smoke run on CPU (tiny shapes, no Triton needed)::

    python -m benchmarks.bench_r_softmax_attention --device cpu --small --providers sdpa eager_softmax reference
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
PROVIDERS = ("sdpa", "eager_softmax", "reference", "triton", "entmax", "adasplash")
BASELINE = "sdpa"
MASKS = ("causal", "padded")


@dataclass
class Inputs:
    """One case's tensors, shared by every provider: q, k, v ``[B, H, N, D]`` (requiring grad), the key lengths
    ``[B]``, the key padding ``[B, N]`` (None when causal) and the bool mask ``[B, 1, 1 or N, N]`` for masked
    providers."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    key_padding: torch.Tensor | None
    mask: torch.Tensor
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
    if causal:
        lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
        rows = torch.arange(length, device=device)
        mask = (rows[None, :] <= rows[:, None])[None, None]  # (1, 1, N, N)
        key_padding = None
    else:  # lengths spread evenly over [N/2, N]
        lengths = torch.linspace(length // 2, length, batch, device=device).round().to(torch.int32)
        key_padding = torch.arange(length, device=device)[None, :] < lengths[:, None]  # (B, N)
        mask = key_padding[:, None, None, :]  # (B, 1, 1, N)
    return Inputs(q, k, v, lengths, key_padding, mask, causal, rate)


def _eager_scores(inputs: Inputs) -> torch.Tensor:
    scores = inputs.q @ inputs.k.transpose(-1, -2) * inputs.q.shape[-1] ** -0.5  # (B, H, N, N)
    return scores.masked_fill(~inputs.mask, float("-inf"))


def _entmax(inputs: Inputs) -> torch.Tensor:
    from entmax import entmax15

    return entmax15(_eager_scores(inputs).float(), dim=-1).to(inputs.v.dtype) @ inputs.v


def _adasplash(inputs: Inputs) -> torch.Tensor:
    from adasplash import adasplash

    varlen = None if inputs.causal else inputs.lengths
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
    """Our kernel must match the reference before it is timed (fp32 accumulation; bf16/fp16 tolerance)."""
    if not {"triton", "reference"} <= set(providers):
        return
    with torch.no_grad():
        try:
            expected = FORWARDS["reference"](inputs).float()
        except torch.OutOfMemoryError:
            return
        actual = FORWARDS["triton"](inputs).float()
    tolerance = 1e-4 if inputs.q.dtype == torch.float32 else 5e-2
    error = (actual - expected).abs().max().item()
    if not error <= tolerance * max(1.0, expected.abs().max().item()):
        raise AssertionError(f"triton differs from reference by {error:.3e} at {tuple(inputs.q.shape)}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=MODES)
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--lengths", nargs="+", type=int, help="sequence lengths N (default 512 ... 8192)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--rate", type=float, default=0.5, help="r-softmax sparsity rate")
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
        ({"B": args.batch, "H": args.heads, "N": n, "D": args.head_dim, "mask": mask}, dtype)
        for mask in args.masks
        for n in args.lengths
        for dtype in args.dtypes
    ]

    def setup_case(shape: dict[str, Any], dtype: torch.dtype) -> Inputs:
        inputs = setup(shape, dtype, device, args.rate)
        check_agreement(inputs, providers)
        return inputs

    def build(provider: str, inputs: Inputs) -> tuple[Callable[[], torch.Tensor], list[torch.Tensor]]:
        return (lambda: FORWARDS[provider](inputs)), [inputs.q, inputs.k, inputs.v]

    header = machine_info(device)
    print(header)
    records = run_grid(providers, cases, args.modes, setup_case, build, device, args.reps)
    add_speedups(records, BASELINE)
    header["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_results(OP, header, records, args.out_dir)
    print(format_table(header, records))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
