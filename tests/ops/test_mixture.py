"""Tests of ``hf_sparse_attn.ops.mixture``: the reference ``log_mixture`` against probability-space sums in float64,
and the streaming ``log_mixture_linear`` against the reference composed with full `[N, K, V]` tensors."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_sparse_attn.ops.mixture import LOG_NORMALIZERS, log_mixture, log_mixture_linear


def inputs(n=7, k=3, d=5, v=11, bias=True, seed=0, dtype=torch.float64):
    """log_prior [N, K], features [N, K, D], weight [V, D], bias [V] (or None), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    log_prior = torch.randn(n, k, generator=gen, dtype=dtype).log_softmax(-1)
    tensors = [
        log_prior,
        torch.randn(n, k, d, generator=gen, dtype=dtype).tanh(),
        torch.randn(v, d, generator=gen, dtype=dtype) * 2,
        torch.randn(v, generator=gen, dtype=dtype) if bias else None,
    ]
    return [None if t is None else t.requires_grad_() for t in tensors]


def composed_reference(log_prior, features, weight, bias, component):
    """All K components at once: [N, K, V] logits -> log f -> log_mixture."""
    logits = features @ weight.T + (0 if bias is None else bias)  # [N, K, V]
    return log_mixture(log_prior, LOG_NORMALIZERS[component](logits))


def test_log_mixture_matches_probability_space_sum():
    gen = torch.Generator().manual_seed(0)
    prior = torch.rand(4, 3, generator=gen, dtype=torch.float64)
    prior /= prior.sum(-1, keepdim=True)  # [N, K]
    probs = torch.rand(4, 3, 6, generator=gen, dtype=torch.float64)
    probs /= probs.sum(-1, keepdim=True)  # [N, K, V]
    expected = (prior[..., None] * probs).sum(1)
    torch.testing.assert_close(log_mixture(prior.log(), probs.log()).exp(), expected)


def test_single_component_is_the_component():
    component = torch.randn(5, 1, 9).log_softmax(-1)
    torch.testing.assert_close(log_mixture(torch.zeros(5, 1), component), component[:, 0])


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 5),
    v=st.integers(1, 30),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3]),
    seed=st.integers(0, 2**16),
)
def test_mixture_probabilities_sum_to_one(k, v, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    log_prior = (torch.randn(3, k, generator=gen) * scale).log_softmax(-1)
    components = (torch.randn(3, k, v, generator=gen) * scale).log_softmax(-1)
    out = log_mixture(log_prior, components)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("component", ["softmax", "sigsoftmax"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("chunk_size", [1, 3, None], ids=["chunk1", "chunk3", "chunk-auto"])
def test_streaming_matches_reference_forward_and_backward(component, bias, chunk_size):
    tensors = inputs(bias=bias)
    leaves = [t for t in tensors if t is not None]
    grad = torch.randn(7, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out = log_mixture_linear(*tensors, component=component, chunk_size=chunk_size)
    expected = composed_reference(*tensors, component)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad))


@pytest.mark.parametrize("component", ["softmax", "sigsoftmax"])
def test_gradcheck_float64(component):
    tensors = inputs(n=4, k=2, d=3, v=5)
    assert torch.autograd.gradcheck(
        lambda *t: log_mixture_linear(*t, component=component, chunk_size=3), tuple(tensors)
    )


def test_single_component_streaming_is_the_component():
    log_prior, features, weight, bias = inputs(k=1)
    out = log_mixture_linear(log_prior, features, weight, bias, component="sigsoftmax")
    logits = features[:, 0] @ weight.T + bias
    expected = (logits.exp() * logits.sigmoid()) / (logits.exp() * logits.sigmoid()).sum(-1, keepdim=True)
    torch.testing.assert_close(out.exp(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_give_float32_log_probs(dtype):
    tensors = [t.detach().float() if t is not None else None for t in inputs()]
    out = log_mixture_linear(*[t.to(dtype) for t in tensors])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, composed_reference(*tensors, "softmax"), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("component", ["softmax", "sigsoftmax"])
def test_autocast_bfloat16_matches_float32(component):
    tensors = [t.detach().float().requires_grad_() if t is not None else None for t in inputs()]
    grad = torch.randn(7, 11, generator=torch.Generator().manual_seed(3))
    expected = composed_reference(*tensors, component)
    want = torch.autograd.grad(expected, tensors, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = log_mixture_linear(*tensors, component=component, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)
    for got, ref in zip(torch.autograd.grad(out, tensors, grad), want, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=5e-2 * ref.abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("num_components", [1, 4])
def test_backward_saves_only_inputs_and_output(num_components):
    """Whatever K, autograd keeps the output [N, V] and the (small) inputs, never K [N, V] component tensors."""
    n, v, d = 64, 1000, 8
    tensors = inputs(n=n, k=num_components, d=d, v=v, dtype=torch.float32)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        log_mixture_linear(*tensors, chunk_size=16)
    inputs_bytes = sum(t.untyped_storage().nbytes() for t in tensors if t is not None)
    assert sum(saved.values()) <= inputs_bytes + n * v * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"component": "sparsemax"}, "component must be one of"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"features": torch.zeros(7, 2, 5)}, r"features must be \[N, K, D\] and log_prior \[N, K\]"),
        ({"weight": torch.zeros(11, 4)}, r"weight must be \[V, D\] with D = 5"),
    ],
    ids=["component", "chunk-size", "prior-shape", "weight-shape"],
)
def test_bad_arguments(kwargs, match):
    log_prior, features, weight, bias = (t.detach() for t in inputs())
    args = {"log_prior": log_prior, "features": features, "weight": weight, "bias": bias, **kwargs}
    with pytest.raises(ValueError, match=match):
        log_mixture_linear(**args)


def test_docstring_examples():
    results = doctest.testmod(importlib.import_module("hf_sparse_attn.ops.mixture"))
    assert results.attempted > 0 and results.failed == 0
