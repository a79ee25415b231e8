"""The r-softmax attention kernels go through Triton's real compiler for an sm_90 (H100) target, without a GPU.

Triton's CPU interpreter runs the kernels' Python but checks none of what the compiler does (types carried through
the search loop, ``tl.dot`` shapes and layouts, shared memory). Compiling needs no GPU, only Triton's bundled
toolchain, so this catches compile errors on CPU machines. It runs in a subprocess because this test session
decorates the kernels for the interpreter. It prints each kernel's shared memory, registers per thread and stack
(spill) bytes, read from the cubin with the bundled ``cuobjdump``. About 2 minutes of CPU with a cold Triton cache,
hence ``slow``:
``pytest -m slow tests/kernels/test_r_softmax_attention_compile.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
H100_SHARED_MEMORY = 227 * 1024

#: (dtype, head dim, BLOCK_N): the two ends of the supported range, with the launcher's block sizes
CONFIGS = [("bf16", 64, 64), ("fp32", 128, 32)]

SCRIPT = textwrap.dedent(
    """
    import os
    import re
    import subprocess
    import tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hf_sparse_attn.kernels import r_softmax_attention_triton as kernels
    from hf_sparse_attn.kernels import r_softmax_threshold_triton as threshold

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

    for dtype, head_dim, block_n in {configs}:
        pointers = {{name: "*" + dtype for name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}}
        pointers.update(PAD="*i1", RATE="*fp32", STAT_ARG="*i32", PASSES="*i32", GUESS="*fp32", LOCKS="*i32",
                        CLASS="*i8", LIVE="*u8")
        pointers.update({{name: "*fp32" for name in ("STAT_M", "STAT_T", "STAT_Z", "STAT_DELTA", "STAT_RHO",
                                                     "DQ_ACC")}})
        constants = dict(HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_N=block_n, CLASS_BLOCK=block_n, CAUSAL=True,
                         HAS_PAD=True, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        search = dict(NUM_BUCKETS=threshold.NUM_BUCKETS, ZOOM=threshold.ZOOM, MAX_PASSES=threshold.MAX_PASSES)
        dropout = dict(DROPOUT=dtype == "fp32")  # one configuration with attention dropout, one without
        backward = dict(dropout, DETERMINISTIC=True, HAS_LIVE=True, LIVE_M=64, LIVE_N=block_n)
        kernels_and_extras = ((threshold._threshold_kernel, search), (kernels._output_kernel, dropout),
                              (kernels._bwd_preprocess_kernel, backward), (kernels._bwd_kernel, backward),
                              (kernels._bwd_epilogue_kernel, backward))
        for fn, extra in kernels_and_extras:
            constexprs = {{name: value for name, value in dict(constants, **extra).items() if name in fn.arg_names}}
            scalars = {{"scale": "fp32", "eps": "fp32", "p_drop": "fp32", "seed": "i64"}}
            signature = {{name: "constexpr" if name in constexprs else pointers.get(name, scalars.get(name, "i32"))
                          for name in fn.arg_names}}
            options = dict(num_warps=4, num_stages=2, enable_fp_fusion=False)  # as the launchers (launch_options)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options=options)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:  # registers: from the binary, no GPU needed
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
            n_regs, stack = (re.search(field + r":(\\d+)", usage).group(1) for field in ("REG", "STACK"))
            print(dtype, head_dim, fn.__name__, compiled.metadata.shared, n_regs, stack)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_h100() -> None:
    script = SCRIPT.format(configs=CONFIGS)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)  # the shared memory (bytes) and registers per thread of each kernel, for the docs
    shared = {tuple(line.split()[:3]): int(line.split()[3]) for line in result.stdout.strip().splitlines()}
    kernels = ("_threshold_kernel", "_output_kernel", "_bwd_preprocess_kernel", "_bwd_kernel", "_bwd_epilogue_kernel")
    assert set(shared) == {(dtype, str(dim), name) for dtype, dim, _ in CONFIGS for name in kernels}
    assert all(0 < size <= H100_SHARED_MEMORY for size in shared.values()), shared
    registers = [int(line.split()[4]) for line in result.stdout.strip().splitlines()]
    assert all(0 < count <= 255 for count in registers), result.stdout  # registers per thread (spills: "stack")


#: (dtype, head dim, BLOCK_M, BLOCK_N, num_warps): autotuning candidates of the forward kernels that the pruning keeps
#: (hf_sparse_attn.kernels.tuning), from the smallest to the largest tiles and both ends of the head dims
TUNED_CONFIGS = [
    ("bf16", 64, 64, 32, 4),
    ("bf16", 64, 64, 64, 8),
    ("bf16", 64, 128, 64, 8),
    ("bf16", 128, 64, 128, 8),
    ("fp32", 128, 64, 64, 8),
]

FORWARD_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import os
    import re
    import subprocess
    import tempfile
    import types
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hf_sparse_attn.kernels import r_softmax_attention_triton as kernels
    from hf_sparse_attn.kernels import r_softmax_threshold_triton as threshold
    from hf_sparse_attn.kernels import tuning

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    pointers = dict(PAD="*i1", CLASS="*i8", LIVE="*u8", RATE="*fp32", GUESS="*fp32", PASSES="*i32", STAT_ARG="*i32",
                    STAT_M="*fp32", STAT_T="*fp32", STAT_Z="*fp32")
    scalars = {{"scale": "fp32", "eps": "fp32", "p_drop": "fp32", "seed": "i64"}}
    cuda = types.SimpleNamespace(is_cuda=True)  # for the options of a CUDA launch (no FP fusion) without a GPU
    for dtype, head_dim, block_m, block_n, num_warps in {configs}:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        constants = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CLASS_BLOCK=32, CAUSAL=True,
                         HAS_PAD=True, UPCAST=False, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                         DROPOUT=False, NUM_BUCKETS=threshold.NUM_BUCKETS, ZOOM=threshold.ZOOM,
                         MAX_PASSES=threshold.MAX_PASSES)
        for name, fn in (("threshold", threshold._threshold_kernel), ("output", kernels._output_kernel)):
            assert tuning.fits(name, block_m, block_n, head_dim, torch_dtype, num_warps, 2), (name, block_m, block_n)
            constexprs = {{key: value for key, value in constants.items() if key in fn.arg_names}}
            signature = {{key: "constexpr" if key in constexprs else pointers.get(key, scalars.get(key, "i32"))
                          for key in fn.arg_names}}
            signature.update({{key: "*" + dtype for key in ("Q", "K", "V", "OUT") if key in fn.arg_names}})
            ptx = set()
            for num_stages in (2, 3, 4):
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                                       **threshold.launch_options(cuda, tuned=True)))
                ptx.add(hashlib.sha256(compiled.asm["ptx"].encode()).hexdigest())
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True).stdout
            n_regs, stack = (re.search(field + r":(\\d+)", usage).group(1) for field in ("REG", "STACK"))
            estimate = tuning.shared_memory_estimate(name, block_m, block_n, head_dim, torch_dtype.itemsize, 2)
            print(name, dtype, head_dim, block_m, block_n, num_warps, compiled.metadata.shared, estimate, n_regs,
                  stack, len(ptx))
    """
)


@pytest.mark.slow
def test_tuned_forward_configs_compile_for_h100() -> None:
    """Representative autotuning candidates of the threshold and output kernels compile for sm_90; their shared
    memory fits an H100 block and stays within the pruning's estimate (which the tuner relies on), and
    ``num_stages`` 2, 3 and 4 give the same PTX (why the pruning tunes one stage count: tuning.TUNED_STAGES).
    Prints kernel, dtype, D, BLOCK_M, BLOCK_N, warps, shared bytes, estimate, registers, stack bytes, distinct PTX."""
    script = FORWARD_SCRIPT.format(configs=TUNED_CONFIGS)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout)
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2 * len(TUNED_CONFIGS)
    for row in rows:
        shared, estimate, registers, distinct_ptx = int(row[6]), int(row[7]), int(row[8]), int(row[10])
        assert 0 < shared <= min(estimate, H100_SHARED_MEMORY), row
        assert 0 < registers <= 255, row
        assert distinct_ptx == 1, f"num_stages changes the code now: tune it again (tuning.TUNED_STAGES): {row}"
