"""Tests of ``hf_sparse_attn.ops.sigsoftmax`` against the textbook formula exp(z)·sigmoid(z) / sum in float64."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sparse_attn.ops.sigsoftmax import log_sigsoftmax, sigsoftmax

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
#: (atol, rtol) of each dtype against the float64 reference, on probabilities
TOLERANCES = {torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2), torch.float32: (1e-6, 1e-5)}


def reference(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The definition, in float64 (valid for moderate logits, where exp does not overflow)."""
    z = z.double()
    weights = torch.exp(z) * torch.sigmoid(z)
    return weights / weights.sum(dim, keepdim=True)


@pytest.mark.parametrize("dim", [-1, 0, 1], ids=lambda d: f"dim{d}")
def test_matches_definition(dim):
    z = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4
    torch.testing.assert_close(sigsoftmax(z, dim=dim).double(), reference(z, dim), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(log_sigsoftmax(z, dim=dim).double(), reference(z, dim).log(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_half_precision_is_computed_in_float32(dtype):
    z = (torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 5).to(dtype)
    out = sigsoftmax(z)
    assert out.dtype == dtype and log_sigsoftmax(z).dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), reference(z), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("scale", [1e4, 1e-4], ids=["huge", "tiny"])
def test_extreme_logits_stay_finite(dtype, scale):
    z = (torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]]) * scale).to(dtype)
    log_p = log_sigsoftmax(z)
    assert torch.isfinite(log_p).all()
    p = sigsoftmax(z).double()
    torch.testing.assert_close(p.sum(-1), torch.ones(1, dtype=torch.float64), atol=1e-2, rtol=0)
    if scale > 1:  # the largest logit takes all the mass
        torch.testing.assert_close(p, torch.tensor([[1.0, 0, 0, 0, 0]], dtype=torch.float64))
    else:  # near 0, exp(z)·sigmoid(z) ≈ (1 + z)/2 · (1 + z/2)... the textbook formula is exact enough here
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(p, reference(z), atol=atol, rtol=rtol)


def test_huge_logits_gradient_is_finite():
    z = torch.tensor([[1e4, 0.0, -1e4, 30.0]], requires_grad=True)
    log_sigsoftmax(z)[0, 3].backward()
    assert torch.isfinite(z.grad).all()


def test_not_shift_invariant():
    z = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    shifted = sigsoftmax(z + 3.0)
    assert not torch.allclose(shifted, sigsoftmax(z), atol=1e-3)
    # what the shift does instead: the sigmoid factor is evaluated at z + c while exp(z + c) cancels
    weights = torch.exp(z) * torch.sigmoid(z + 3.0)
    torch.testing.assert_close(shifted, weights / weights.sum())


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-60, 60, allow_nan=False), min_size=1, max_size=40),
    shift=st.floats(-1e3, 1e3, allow_nan=False),
)
def test_probabilities_sum_to_one(values, shift):
    z = torch.tensor(values, dtype=torch.float32) + shift
    p = sigsoftmax(z)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_gradcheck_float64():
    z = torch.randn(3, 6, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(log_sigsoftmax, (z,))
    assert torch.autograd.gradcheck(lambda x: sigsoftmax(x, dim=0), (z,))


def test_docstring_examples():
    results = doctest.testmod(importlib.import_module("hf_sparse_attn.ops.sigsoftmax"))
    assert results.attempted > 0 and results.failed == 0
