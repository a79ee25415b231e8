"""The first-use self-check: the real kernel passes it, deliberately wrong kernels fail it, verdicts warn once.

Without CUDA the real kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``conftest.py``).
Wrong kernels are injected through the check's ``kernel`` parameter; they are built from the reference, so they
cost milliseconds.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import hf_sparse_attn.kernels.dispatch as dispatch
from hf_sparse_attn.kernels import self_check
from hf_sparse_attn.kernels.self_check import SelfChecks, compare_with_reference

needs_triton = pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")


class HalfGradient(torch.autograd.Function):
    """Identity forward, half the gradient backward: a kernel bug that only the gradients show."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad / 2


def reference_kernel(q, k, v, key_padding, rates, causal, scale, eps, *, padding: bool = True) -> torch.Tensor:
    """The kernel's contract computed by the reference (causal = queries aligned to the end of the keys)."""
    offset = k.shape[2] - q.shape[2] if causal else None
    out, _ = dispatch.r_softmax_attention(
        q, k, v, None, rates, scale, eps, key_padding=key_padding if padding else None, causal_offset=offset,
        backend="reference",
    )  # fmt: skip
    return out


def raising_kernel(*args) -> torch.Tensor:
    raise RuntimeError("out of resources: shared memory")


WRONG_KERNELS = {
    "softmax": (
        lambda q, k, v, *rest: torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2),
        "key padding: o differs",
    ),
    "ignores-padding": (lambda *args: reference_kernel(*args, padding=False), "key padding: o differs"),
    "ignores-causality": (lambda q, k, v, p, r, causal, *rest: reference_kernel(q, k, v, p, r, False, *rest), "causal"),
    "half-dv": (lambda q, k, v, *rest: reference_kernel(q, k, HalfGradient.apply(v), *rest), "key padding: dv differs"),
    "nan": (lambda *args: reference_kernel(*args) * float("nan"), "o differs"),
    "raises": (raising_kernel, "the kernel raised RuntimeError: out of resources"),
}


@needs_triton
def test_the_kernel_passes_its_self_check() -> None:
    assert compare_with_reference("cpu", torch.float32, 16) is None


def upcast_kernel(q, k, v, *rest) -> torch.Tensor:
    """A correct implementation that differs from the plain reference: computes in the next wider float and rounds
    the output (and, through autograd, the gradients) to the input dtype, as the kernel's fp32 accumulators do."""
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    return reference_kernel(q.to(wide), k.to(wide), v.to(wide), *rest).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_a_correct_implementation_passes(dtype: torch.dtype) -> None:
    """The criterion is not tighter than correct arithmetic: a wider-precision implementation passes."""
    assert compare_with_reference("cpu", dtype, 16, upcast_kernel) is None


@pytest.mark.parametrize("name", WRONG_KERNELS)
def test_wrong_kernels_fail_the_self_check(name: str) -> None:
    kernel, message = WRONG_KERNELS[name]
    problem = compare_with_reference("cpu", torch.float32, 16, kernel)
    assert problem is not None and message in problem


def test_the_check_leaves_the_callers_state_alone() -> None:
    """It draws from its own generator and computes gradients under no_grad and inference_mode callers."""
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with torch.inference_mode():
        assert compare_with_reference("cpu", torch.float32, 16, reference_kernel) is None
    with torch.no_grad():
        assert compare_with_reference("cpu", torch.float32, 16, WRONG_KERNELS["half-dv"][0]) is not None
    assert torch.equal(torch.rand(3), expected)


def test_verdicts_are_computed_once_and_a_failure_warns_once() -> None:
    calls = []

    def wrong(*args):
        calls.append(args[0].shape[-1])
        return WRONG_KERNELS["softmax"][0](*args)

    checks = SelfChecks(kernel=wrong)
    with pytest.warns(RuntimeWarning, match=r"failed its self-check for torch.float32, head dim 16 on cpu"):
        assert not checks.verified("cpu", torch.float32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call neither checks nor warns
        assert not checks.verified("cpu", torch.float32, 16)
    with pytest.warns(RuntimeWarning, match="head dim 32"):  # another combination is checked on its own
        assert not checks.verified("cpu", torch.float32, 32)
    assert calls == [16, 32]
    assert SelfChecks(kernel=reference_kernel).verified("cpu", torch.float32, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not dispatch.triton_available(), reason="needs CUDA and triton")
@pytest.mark.parametrize("override", [None, "1", "0"], ids=["auto", "force", "off"])
def test_auto_backend_on_cuda_follows_the_self_check(monkeypatch: pytest.MonkeyPatch, override: str | None) -> None:
    """On CUDA, ``auto`` checks each (device, dtype, head dim) once and uses the kernel only after it passed;
    a failed verdict sends it to the reference; ``HF_SPARSE_ATTN_KERNELS=1`` skips the check, ``=0`` the kernel."""
    if override is None:
        monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.KERNELS_ENV, override)
    monkeypatch.setattr(self_check.CHECKS, "verdicts", {})  # a fresh process's verdicts
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    key = (q.device, q.dtype, 64)
    _, weights = dispatch.r_softmax_attention(q, k, v, rate=0.5, causal_offset=0)
    assert (weights is None) == (override != "0")
    assert (key in self_check.CHECKS.verdicts) == (override is None)
    if override is None:
        assert self_check.CHECKS.verdicts[key]
        self_check.CHECKS.verdicts[key] = False
        _, weights = dispatch.r_softmax_attention(q, k, v, rate=0.5, causal_offset=0)
        assert weights is not None
