"""Tests of the PLIF transform ``hf_sparse_attn.ops.monotonic`` against an independent sum-of-ramps formula."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sparse_attn.ops import monotonic
from hf_sparse_attn.ops.monotonic import monotonic_transform

DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def slopes_of(theta: torch.Tensor) -> torch.Tensor:
    """The documented parametrisation: softplus(theta + log(e - 1)), slope 1 at theta = 0."""
    return F.softplus(theta.double() + math.log(math.e - 1))


def ramps_reference(z: torch.Tensor, theta: torch.Tensor, knot_range: float) -> torch.Tensor:
    """f(z) = -T + sum_j s_j * clamp(z - x_j, 0, delta) + edge extensions, one term per segment (O(K) per logit)."""
    z, slopes = z.double(), slopes_of(theta)
    delta = 2 * knot_range / slopes.numel()
    out = -knot_range + slopes[0] * torch.clamp(z + knot_range, max=0) + slopes[-1] * torch.clamp(z - knot_range, min=0)
    for j, slope in enumerate(slopes):
        out = out + slope * torch.clamp(z - (-knot_range + j * delta), 0, delta)
    return out


def random_theta(num_knots: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(num_knots - 1, dtype=dtype, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("num_knots", [2, 3, 17, 1000], ids=lambda k: f"K{k}")
def test_identity_at_init(num_knots):
    theta = torch.zeros(num_knots - 1)
    z = torch.cat([torch.linspace(-50, 50, 1001), torch.tensor([-1e4, 1e4, -20.0, 20.0, 0.0])])
    torch.testing.assert_close(monotonic_transform(z, theta, knot_range=20.0), z, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("num_knots", [2, 5, 64], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("knot_range", [1.0, 20.0], ids=lambda t: f"T{t:g}")
def test_matches_sum_of_ramps_forward_and_backward(num_knots, knot_range):
    theta = random_theta(num_knots, seed=num_knots).requires_grad_()
    z = torch.randn(4, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5 * knot_range
    z.requires_grad_()
    grad = torch.randn(4, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = monotonic_transform(z, theta, knot_range)
    expected = ramps_reference(z, theta, knot_range)
    torch.testing.assert_close(out, expected)
    got = torch.autograd.grad(out, (z, theta), grad)
    want = torch.autograd.grad(expected, (z, theta), grad)
    torch.testing.assert_close(got, want)


def test_chunked_lookup_matches_single_chunk(monkeypatch):
    theta = random_theta(12, seed=8).requires_grad_()
    z = (torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 4).requires_grad_()
    grad = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    expected = ramps_reference(z, theta, 3.0)
    monkeypatch.setattr(monotonic, "CHUNK_ELEMENTS", 7)  # 45 logits -> 7 chunks, the last one partial
    out = monotonic_transform(z, theta, 3.0)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(
        torch.autograd.grad(out, (z, theta), grad), torch.autograd.grad(expected, (z, theta), grad)
    )


def test_gradcheck_float64():
    theta = random_theta(6, seed=3).requires_grad_()
    # points inside the grid and on both linear extensions; none on a knot, where f is not differentiable
    z = torch.tensor([[-3.7, -1.93, -0.41, 0.27, 1.11, 2.6]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z, t: monotonic_transform(z, t, 2.0), (z, theta))


@settings(max_examples=50, deadline=None)
@given(
    theta=st.lists(st.floats(-10, 10), min_size=1, max_size=30),
    points=st.lists(st.floats(-100, 100), min_size=2, max_size=30, unique=True),
)
def test_strictly_increasing(theta, points):
    z = torch.tensor(sorted(points), dtype=torch.float64)
    z = z[torch.cat([torch.tensor([True]), z.diff() > 1e-3])]  # keep points at least 1e-3 apart
    out = monotonic_transform(z, torch.tensor(theta, dtype=torch.float64), knot_range=5.0)
    assert (out.diff() > 0).all()


def test_linear_extrapolation_uses_edge_slopes():
    knot_range = 3.0
    theta = random_theta(9, seed=4)
    slopes = slopes_of(theta)
    edges = monotonic_transform(torch.tensor([-knot_range, knot_range], dtype=torch.float64), theta, knot_range)
    z = torch.tensor([-1e3, -10.0, -3.5], dtype=torch.float64)
    torch.testing.assert_close(monotonic_transform(z, theta, knot_range), edges[0] + slopes[0] * (z + knot_range))
    z = torch.tensor([3.5, 10.0, 1e3], dtype=torch.float64)
    torch.testing.assert_close(monotonic_transform(z, theta, knot_range), edges[1] + slopes[-1] * (z - knot_range))
    # f(-T) = -T whatever the slopes: the map is anchored at the left end of the grid
    torch.testing.assert_close(edges[0], torch.tensor(-knot_range, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_half_precision_and_extreme_logits(dtype):
    theta = random_theta(50, seed=5, dtype=torch.float32)
    z = torch.cat([torch.randn(200, generator=torch.Generator().manual_seed(6)) * 10, torch.tensor([-1e4, 1e4])])
    z = z.to(dtype)
    out = monotonic_transform(z, theta, knot_range=20.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = ramps_reference(z, theta, 20.0).to(dtype)
    torch.testing.assert_close(out, expected)


def test_nan_propagates_instead_of_breaking_the_lookup():
    theta = random_theta(4, seed=7)
    out = monotonic_transform(torch.tensor([float("nan"), 0.5], dtype=torch.float64), theta, knot_range=1.0)
    assert math.isnan(out[0]) and math.isfinite(out[1])


@pytest.mark.parametrize(
    ("theta", "knot_range", "match"),
    [
        (torch.zeros(3), 0.0, "knot_range must be > 0"),
        (torch.zeros(3), -1.0, "knot_range must be > 0"),
        (torch.zeros(0), 1.0, "theta must be 1-D"),
        (torch.zeros(2, 2), 1.0, "theta must be 1-D"),
    ],
    ids=["range-zero", "range-negative", "theta-empty", "theta-2d"],
)
def test_bad_arguments(theta, knot_range, match):
    with pytest.raises(ValueError, match=match):
        monotonic_transform(torch.zeros(3), theta, knot_range)


def test_docstring_examples():
    results = doctest.testmod(importlib.import_module("hf_sparse_attn.ops.monotonic"))
    assert results.attempted > 0 and results.failed == 0
