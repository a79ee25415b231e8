"""Tests of ``hf_sparse_attn.ops.head_loss``: the fused, chunked head loss against ``F.cross_entropy`` on the full
`[N, V]` log-probabilities of each head, built independently in float64 (sigsoftmax and the mixtures in
probability space), forward and backward; float64 gradcheck; ignore_index / smoothing / reduction; half precision;
PLIF's deterministic segment sums; memory; bad input."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from hf_sparse_attn.ops.head_loss import (
    HEAD_LOSS_NAMES,
    _segment_sums,
    _sorted_segment_sums,
    head_loss,
    row_loss_and_grad,
)
from hf_sparse_attn.ops.monotonic import monotonic_transform

N, D, V, K = 9, 5, 13, 3
KNOT_RANGE = 3.0


def make_inputs(head: str, *, bias: bool = True, seed: int = 0, dtype=torch.float64, n: int = N, v: int = V):
    """(tensors requiring grad by name, options for head_loss, labels with two ignored tokens)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "hidden": torch.randn(n, D, generator=gen, dtype=dtype),
        "weight": torch.randn(v, D, generator=gen, dtype=dtype),
    }
    if bias:
        tensors["bias"] = torch.randn(v, generator=gen, dtype=dtype)
    if head == "plif":  # 6 knots over [-3, 3]: logits ~N(0, 5) fall in every segment and beyond
        tensors["theta"] = torch.randn(5, generator=gen, dtype=dtype)
    if head in ("mos", "moss"):
        tensors["prior"] = torch.randn(K, D, generator=gen, dtype=dtype)
        tensors["projections"] = torch.randn(K, D, D, generator=gen, dtype=dtype) / D**0.5
    for t in tensors.values():
        t.requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[1, n - 2]] = -100
    return tensors, labels


def mixture_of(tensors):
    def mixture(hidden):  # [C, D] -> log pi [C, K], tanh(P_k h) [C, K, D]
        log_prior = (hidden @ tensors["prior"].T).log_softmax(-1)
        return log_prior, torch.tanh(torch.einsum("kij,nj->nki", tensors["projections"], hidden))

    return mixture


def fused(head, tensors, labels, **kwargs):
    options = {}
    if head == "plif":
        options = {"theta": tensors["theta"], "knot_range": KNOT_RANGE}
    if head in ("mos", "moss"):
        options = {"mixture": mixture_of(tensors), "mixture_params": [tensors["prior"], tensors["projections"]]}
    return head_loss(tensors["hidden"], tensors["weight"], labels, tensors.get("bias"), head=head, **options, **kwargs)


def full_log_probs(head, tensors):
    """[N, V] log P of the head, from the whole logits matrix (the unfused computation)."""
    hidden, weight, bias = tensors["hidden"], tensors["weight"], tensors.get("bias")

    def linear(x):
        return x @ weight.T + (0 if bias is None else bias)

    def unnormalised(z):  # softmax: exp(z); sigsoftmax: exp(z) sigmoid(z)
        return z.exp() * (torch.sigmoid(z) if head in ("sigsoftmax", "moss") else 1)

    if head in ("softmax", "sigsoftmax"):
        p = unnormalised(linear(hidden))
        return (p / p.sum(-1, keepdim=True)).log()
    if head == "plif":
        return monotonic_transform(linear(hidden), tensors["theta"], KNOT_RANGE).log_softmax(-1)
    log_prior, features = mixture_of(tensors)(hidden)
    p = unnormalised(linear(features))  # [N, K, V]
    return ((p / p.sum(-1, keepdim=True)) * log_prior.exp()[..., None]).sum(1).log()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15], ids=["eps0", "eps0.15"])
@pytest.mark.parametrize("chunk_size", [4, 64], ids=["chunk4", "chunk64"])
@pytest.mark.parametrize("head", HEAD_LOSS_NAMES)
def test_matches_cross_entropy_of_full_log_probs(head, chunk_size, smoothing, reduction):
    tensors, labels = make_inputs(head)
    leaves = list(tensors.values())
    expected = F.cross_entropy(full_log_probs(head, tensors), labels, label_smoothing=smoothing, reduction=reduction)
    expected_grads = torch.autograd.grad(expected, leaves)
    loss = fused(head, tensors, labels, label_smoothing=smoothing, reduction=reduction, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss, leaves)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for name, got, want in zip(tensors, grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=lambda m, name=name: f"d/d{name}: {m}")


@pytest.mark.parametrize("head", HEAD_LOSS_NAMES)
def test_gradcheck_float64(head):
    tensors, labels = make_inputs(head, n=5, v=7)
    names = list(tensors)

    def loss(*leaves):  # x 0.5: an upstream gradient != 1 keeps the stored gradients for gradcheck's repeated VJPs
        return 0.5 * fused(head, dict(zip(names, leaves, strict=True)), labels, label_smoothing=0.1, chunk_size=2)

    assert torch.autograd.gradcheck(loss, tuple(tensors.values()))


def test_a_second_backward_needs_a_new_forward():
    tensors, labels = make_inputs("softmax")
    loss = fused("softmax", tensors, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the loss again"):
        loss.backward()


def test_without_bias_and_with_leading_dims():
    tensors, labels = make_inputs("sigsoftmax", bias=False)
    expected = F.cross_entropy(full_log_probs("sigsoftmax", tensors), labels)
    hidden = tensors["hidden"].reshape(3, 3, D)
    loss = head_loss(hidden, tensors["weight"], labels.reshape(3, 3), head="sigsoftmax", chunk_size=2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_every_label_ignored():
    tensors, labels = make_inputs("softmax")
    labels[:] = -100
    assert torch.isnan(fused("softmax", tensors, labels))  # a mean over no token, as F.cross_entropy
    loss = fused("softmax", tensors, labels, reduction="sum")
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in torch.autograd.grad(loss, list(tensors.values())))


def test_custom_ignore_index():
    tensors, labels = make_inputs("plif")
    labels[labels == -100] = 4
    expected = F.cross_entropy(full_log_probs("plif", tensors), labels, ignore_index=4)
    torch.testing.assert_close(fused("plif", tensors, labels, ignore_index=4), expected, rtol=1e-10, atol=1e-12)


def test_no_gradients_needed_computes_only_the_loss():
    tensors, labels = make_inputs("moss")
    expected = fused("moss", tensors, labels)
    with torch.no_grad():
        loss = fused("moss", tensors, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head", HEAD_LOSS_NAMES)
def test_half_precision_accumulates_in_float32(head, dtype):
    # The same half-precision inputs, upcast: the fused loss rounds only the matmul inputs/outputs to `dtype`, so
    # it agrees with float32 maths up to one rounding of the logits (relative 2**-8 for bf16, 2**-11 for fp16).
    tensors, labels = make_inputs(head, dtype=dtype, n=40, v=50)
    loss = fused(head, tensors, labels, chunk_size=8)
    grads = torch.autograd.grad(loss, list(tensors.values()))
    upcast = {name: t.detach().float().requires_grad_() for name, t in tensors.items()}
    expected = F.cross_entropy(full_log_probs(head, upcast), labels)
    expected_grads = torch.autograd.grad(expected, list(upcast.values()))
    eps = torch.finfo(dtype).eps
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(loss, expected, rtol=8 * eps, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.float(), want, rtol=16 * eps, atol=16 * eps * want.abs().max().item())


def test_plif_gradients_are_reproducible_bit_for_bit():
    tensors, labels = make_inputs("plif", n=64, v=200)
    runs = [torch.autograd.grad(fused("plif", tensors, labels, chunk_size=7), [tensors["theta"]])[0] for _ in range(3)]
    assert all(torch.equal(runs[0], run) for run in runs[1:])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=60),
    st.integers(0, 2**31 - 1),
)
def test_sorted_segment_sums_equal_index_add(index, seed):
    index = torch.tensor(index)
    values = torch.randn(len(index), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = torch.zeros(7, dtype=torch.float64).index_add_(0, index, values)
    torch.testing.assert_close(_sorted_segment_sums(index, values, 7), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_segment_sums(index, values, 7), expected, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 40), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 2**31 - 1))
def test_row_gradients_sum_to_zero_and_loss_is_at_least_entropy_bound(rows, vocab, smoothing, sigsoftmax, seed):
    # Invariants of the row work: sum_v (p - q) = 0 (before the sigsoftmax Jacobian); the cross-entropy against q
    # is >= 0, and the loss equals the float64 autograd of the same expression.
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    weights = torch.rand(rows, generator=gen, dtype=torch.float64)
    u = 2 * z - F.softplus(z) if sigsoftmax else z
    per_row = F.cross_entropy(u, labels, label_smoothing=smoothing, reduction="none") * weights
    (expected_grad,) = torch.autograd.grad(per_row.sum(), z)
    scores = z.detach().clone()
    loss = row_loss_and_grad(scores, labels, weights, smoothing, sigsoftmax)
    torch.testing.assert_close(loss, per_row.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores, expected_grad, rtol=1e-12, atol=1e-12)
    assert (loss >= -1e-12).all()
    if not sigsoftmax:
        torch.testing.assert_close(scores.sum(1), torch.zeros(rows, dtype=torch.float64), rtol=0, atol=1e-12)


def peak_bytes(fn) -> int:
    """Peak CPU bytes allocated while ``fn`` runs (profiler memory events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("head", HEAD_LOSS_NAMES)
def test_memory_is_a_few_chunks_not_tokens_times_vocab(head):
    # 512 tokens x 4096 words: one [N, V] float32 tensor is 8 MiB; with 16-token chunks (256 KiB each) the peak is
    # the gradients of the inputs (dW: 64 KiB x D...) plus a few chunk buffers, far below one [N, V] tensor.
    n, v = 512, 4096
    tensors, labels = make_inputs(head, dtype=torch.float32, n=n, v=v)

    def run():
        fused(head, tensors, labels, chunk_size=16).backward()

    logits_bytes = n * v * 4
    assert peak_bytes(run) < 0.25 * logits_bytes


def test_bad_input():
    tensors, labels = make_inputs("softmax")
    hidden, weight = tensors["hidden"], tensors["weight"]
    with pytest.raises(ValueError, match="head must be one of"):
        head_loss(hidden, weight, labels, head="sparsemax")
    with pytest.raises(ValueError, match="reduction must be one of"):
        head_loss(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="label_smoothing must be a float in"):
        head_loss(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must be"):
        head_loss(hidden, weight[:, :2], labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        head_loss(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias must be"):
        head_loss(hidden, weight, labels, weight[0])
    with pytest.raises(ValueError, match="needs theta"):
        head_loss(hidden, weight, labels, head="plif")
    with pytest.raises(ValueError, match="needs mixture"):
        head_loss(hidden, weight, labels, head="moss")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        head_loss(hidden, weight, labels, chunk_size=0)


def test_doctests():
    module = importlib.import_module("hf_sparse_attn.ops.head_loss")
    result = doctest.testmod(module, extraglobs={"torch": torch, "F": F})
    assert result.attempted > 0 and result.failed == 0
