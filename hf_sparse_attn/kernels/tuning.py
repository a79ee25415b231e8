"""Launch configurations of the r-softmax attention forward kernels: candidates, pruning and defaults.

The threshold kernel (``r_softmax_threshold_triton._threshold_kernel``) is autotuned on CUDA with
``triton.autotune`` over :func:`threshold_configs` (block sizes, warps, stages), keyed on the head dimension, the
input dtypes, causality, key padding and ``S`` rounded up to a power of 2 (``s_bucket``); timings are cached on
disk (``cache_results``). **Its choice drives the output kernel** (``r_softmax_attention_triton._output_kernel``),
which runs with the same tile, warps and stages: the threshold kernel writes a live-tile bitmask per
``(BLOCK_M, BLOCK_N)`` tile that the output kernel reads, and both must compute the same fp32 scores (the output
kernel's argmax test ``x = m`` and the bitmask's argument rely on it; ``tl.dot`` at another warp count may sum the
head dimension in another order). Triton's interpreter cannot time kernels (``triton.autotune`` uses CUDA
events), so on CPU, and whenever the caller fixes the blocks (tests do), one configuration is launched directly:
the given blocks or :func:`default_blocks`, :data:`DEFAULT_LAUNCH` warps and stages.

Pruning (``early_config_prune``, per head dim and dtype) keeps a configuration when

- its shared memory fits an H100 block (:data:`SHARED_MEMORY_LIMIT`), estimated as resident ``Q`` plus
  ``num_stages`` buffers of each streamed operand (``K``; ``K`` and ``V`` in the output kernel):
  ``bytes(dtype) D (BLOCK_M + num_stages streams BLOCK_N)``. This bounds what Triton 3.9 allocates for these kernels
  (compiled sizes in ``docs/kernels.md``, checked by ``tests/kernels/test_r_softmax_attention_compile.py``);
- a thread holds at most :data:`TILE_ELEMENTS_PER_THREAD` elements of the ``[BLOCK_M, BLOCK_N]`` score tile (the
  threshold kernel keeps about six tile-sized temporaries, the output kernel a score tile, its weights and the
  ``[BLOCK_M, D]`` accumulator): beyond that the kernels spill registers at 255 per thread, which compiles but is
  never the fastest, so benchmarking it only costs tuning time;
- a thread holds at most :data:`TILE_ELEMENTS_PER_THREAD` 32-bit words of the resident ``[BLOCK_M, D]`` query block;
- its ``num_stages`` is :data:`TUNED_STAGES`: Triton 3.9 does not software-pipeline these kernels' key loops
  (the loads sit under the dead-tile branch, and the search loop nests them in a ``while``), so ``num_stages`` 2, 3
  and 4 compile to the same PTX (the compile test checks this) and timing all three would triple the tuning time
  for nothing. When a Triton version pipelines them, that test fails and the stages rejoin the tuning.
"""

from __future__ import annotations

import itertools

import torch
import triton

__all__ = [
    "BLOCK_M_CANDIDATES",
    "BLOCK_N_CANDIDATES",
    "DEFAULT_LAUNCH",
    "SHARED_MEMORY_LIMIT",
    "autotuned",
    "default_blocks",
    "fits",
    "prune_threshold_configs",
    "s_bucket",
    "shared_memory_estimate",
    "threshold_configs",
]

BLOCK_M_CANDIDATES = (64, 128)
BLOCK_N_CANDIDATES = (32, 64, 128)
NUM_WARPS_CANDIDATES = (4, 8)
NUM_STAGES_CANDIDATES = (2, 3, 4)
#: shared memory one block may use on an H100 (228 KB per SM, 1 KB of it reserved per block)
SHARED_MEMORY_LIMIT = 227 * 1024
#: register budget proxy: score-tile elements and query-block words per thread (32 threads per warp). At 32 the
#: kernels compile to 230-255 registers per thread (bf16, D = 64, 64 x 64 at 4 warps; table in docs/kernels.md)
TILE_ELEMENTS_PER_THREAD = 32
#: the one ``num_stages`` the pruning keeps (see the module docstring)
TUNED_STAGES = (2,)
#: warps and stages of an untuned CUDA launch (the caller fixed the blocks)
DEFAULT_LAUNCH = {"num_warps": 4, "num_stages": 2}
#: streamed operands per key tile: K for the threshold search, K and V for the output pass
_STREAMS = {"threshold": 1, "output": 2}


def autotuned(q: torch.Tensor, block_m: int | None, block_n: int | None) -> bool:
    """Whether a forward launch autotunes: on CUDA, when the caller fixes neither block size."""
    return q.is_cuda and block_m is None and block_n is None


def default_blocks(head_dim: int, is_cuda: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` when nothing is tuned: 64 x 64 (64 x 32 for ``D = 128`` on CUDA). On the interpreter,
    whose cost grows with the number of operations rather than their size, 64 x 64 always."""
    return 64, 64 if not is_cuda or head_dim <= 64 else 32


def s_bucket(s_len: int) -> int:
    """The key length as the autotuning key sees it: rounded up to a power of 2 (so one tuning per octave)."""
    return triton.next_power_of_2(max(s_len, 1))


def shared_memory_estimate(
    kernel: str, block_m: int, block_n: int, head_dim: int, element_size: int, num_stages: int
) -> int:
    """Upper estimate of a forward kernel's shared memory in bytes: ``Q`` resident plus ``num_stages`` buffers of
    each streamed operand (``kernel`` is ``"threshold"`` or ``"output"``)."""
    return element_size * head_dim * (block_m + num_stages * _STREAMS[kernel] * block_n)


def fits(
    kernel: str, block_m: int, block_n: int, head_dim: int, dtype: torch.dtype, num_warps: int, num_stages: int
) -> bool:
    """Whether a configuration passes the pruning rules of the module docstring."""
    threads = 32 * num_warps
    element_size = torch.empty((), dtype=dtype).element_size()
    shared = shared_memory_estimate(kernel, block_m, block_n, head_dim, element_size, num_stages)
    query_words = block_m * head_dim * element_size // (4 * threads)
    return (
        num_stages in TUNED_STAGES
        and shared <= SHARED_MEMORY_LIMIT
        and block_m * block_n <= TILE_ELEMENTS_PER_THREAD * threads
        and query_words <= TILE_ELEMENTS_PER_THREAD
    )


def threshold_configs() -> list[triton.Config]:
    """Every candidate of the threshold kernel: block sizes, warps and stages (pruned per call)."""
    grid = itertools.product(BLOCK_M_CANDIDATES, BLOCK_N_CANDIDATES, NUM_WARPS_CANDIDATES, NUM_STAGES_CANDIDATES)
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in grid
    ]


def prune_threshold_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune`` of the threshold kernel: the candidates with which both forward kernels fit (head dim
    and dtype of the call; the output kernel runs with the same configuration)."""
    head_dim, dtype = kwargs["HEAD_DIM"], named_args["Q"].dtype
    kept = []
    for config in configs:
        launch = (
            config.kwargs["BLOCK_M"],
            config.kwargs["BLOCK_N"],
            head_dim,
            dtype,
            config.num_warps,
            config.num_stages,
        )
        if fits("threshold", *launch) and fits("output", *launch):
            kept.append(config)
    return kept
