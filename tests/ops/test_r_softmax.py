"""Tests of the r-softmax reference (``hf_sparse_attn.ops.r_softmax``), the specification kernels must match.

Expected values never come from the code under test: golden rows come from the official gmum/rsoftmax tests
(DESIGN §2), thresholds from ``torch.quantile`` on the sliced valid entries, gradients from finite differences
(``gradcheck``) and from autograd through the plain-torch twin ``_r_softmax_autograd``, the rest from invariants.
"""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from hf_sparse_attn.ops.r_softmax import RSoftmax, _r_softmax_autograd, _sort_rows, r_softmax, r_softmax_margin

EPS = 1e-8
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def random_mask(shape: tuple[int, ...], generator: torch.Generator, keep: float = 0.7) -> torch.Tensor:
    """Random valid positions with one fully masked row and one row with a single valid position."""
    mask = torch.rand(shape, generator=generator) < keep
    mask.view(-1, shape[-1])[0] = False
    mask.view(-1, shape[-1])[1] = False
    mask.view(-1, shape[-1])[1, 2] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Golden rows (unmasked, eps = 1e-8): DESIGN §2, taken from the official tests (gmum/rsoftmax test_rsoftmax.py).

GOLDEN = {
    "3-2-1-r.5": ([[3, 2, 1]], 0.5, [[1, 0, 0]]),
    "4-5-6-r.5": ([[4, 5, 6]], 0.5, [[0, 0, 1]]),
    "3-2-1-1-r.5": ([[3, 2, 1, 1]], 0.5, [[0.8908, 0.1092, 0, 0]]),
    "4-6-6-5-r.5": ([[4, 6, 6, 5]], 0.5, [[0, 0.5, 0.5, 0]]),
    "3-2-1-1-r.75": ([[3, 2, 1, 1]], 0.75, [[1, 0, 0, 0]]),
    "per-row-r": ([[3, 2, 1, 1], [4, 6, 5, 5]], [[0.75], [0.25]], [[1, 0, 0, 0], [0, 0.8717, 0.0641, 0.0641]]),
    "zeros-r.5": ([[0, 0, 0]], 0.5, [[1 / 3, 1 / 3, 1 / 3]]),
    "negative-r.75": ([[-2.4, -4.3, -1.3, -34.3], [-20.3, -2.3, -42.3, -1e-6]], 0.75, [[0, 0, 1, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(("x", "r", "expected"), GOLDEN.values(), ids=GOLDEN.keys())
def test_golden_rows_from_official_tests(x, r, expected, dtype):
    r = torch.tensor(r) if isinstance(r, list) else r
    out = r_softmax(torch.tensor(x, dtype=dtype), r)
    assert out.dtype == dtype
    # The official expectations carry 4 decimals; in float64 the entry at the quantile keeps weight eps (~1e-9).
    torch.testing.assert_close(out, torch.tensor(expected, dtype=dtype), rtol=0, atol=1e-4)


def test_rate_as_one_element_tensor_like_the_official_tests():
    x = torch.tensor([[3.0, 2.0, 1.0], [4.0, 5.0, 6.0]])
    torch.testing.assert_close(r_softmax(x, torch.tensor([0.5])), r_softmax(x, 0.5), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The threshold: the sort-based masked quantile against torch.quantile on the sliced valid entries.


@pytest.mark.parametrize("values", ["continuous", "integer-ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_margin_matches_torch_quantile_on_sliced_valid_entries(values, dtype):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4, 13)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    if values == "integer-ties":
        x = (3 * x).round()
    mask = random_mask(shape, generator)
    rates = torch.rand((3, 4, 1), generator=generator, dtype=dtype)
    rates[0, 2], rates[0, 3], rates[1, 0] = 0.0, 1.0, 0.5
    margin = r_softmax_margin(x, rates, mask=mask)
    assert margin.shape == (3, 4, 1) and margin.dtype == dtype
    for index in torch.cartesian_prod(*map(torch.arange, shape[:-1])).tolist():
        row, valid = x[tuple(index)], mask[tuple(index)]
        if not valid.any():
            assert margin[tuple(index)] == torch.tensor(EPS, dtype=dtype)
            continue
        rate = rates[tuple(index)].squeeze()
        expected = row[valid].max() - torch.quantile(row[valid], rate) + EPS
        torch.testing.assert_close(margin[tuple(index)].squeeze(), expected)


def test_zeros_are_exactly_the_entries_at_or_below_the_threshold():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    out = r_softmax(x, 0.3)
    threshold = torch.quantile(x, 0.3, dim=-1, keepdim=True) - EPS
    assert torch.equal(out == 0, x <= threshold)


def test_margin_is_bit_for_bit_torch_quantile_on_padded_attention_scores():
    """Exact, not merely close: the thresholds equal ``max - torch.quantile + eps`` of the sliced valid scores bit
    for bit, on [B, H, T, S] scores with the key padding of a batch of sentences (kernels are held to the same
    thresholds)."""
    generator = torch.Generator().manual_seed(11)
    x = 3 * torch.randn(2, 3, 8, 40, generator=generator)  # B, H, T, S
    mask = torch.ones(2, 1, 8, 40, dtype=torch.bool)
    mask[1, ..., 29:] = False  # the second sequence has 29 tokens
    rates = torch.rand(1, 3, 1, 1, generator=generator)
    margin = r_softmax_margin(x, rates, mask=mask)
    for b, h, t in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(8)).tolist():
        row = x[b, h, t][mask[b, 0, t]]
        expected = row.max() - torch.quantile(row, rates[0, h, 0, 0]) + EPS
        assert margin[b, h, t, 0] == expected


@settings(max_examples=150, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(-40, 40), st.booleans()), min_size=1, max_size=40),
    r=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_property_margin_is_torch_quantile_bit_for_bit(pairs, r, dtype):
    """On rows with many ties and random masks, the threshold is torch.quantile's on the valid entries exactly."""
    x = torch.tensor([value / 8 for value, _ in pairs], dtype=dtype)
    mask = torch.tensor([valid for _, valid in pairs])
    margin = r_softmax_margin(x, r, mask=mask)
    if not mask.any():
        assert margin == EPS
        return
    valid = x[mask]
    assert margin == valid.max() - torch.quantile(valid, r) + EPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 17, 128, 1000])
def test_row_sort_equals_torch_sort(n, dtype):
    """The quantile's sort (numpy's vectorised sort on CPU) against torch.sort: ties, infinities, NaN, signed zeros,
    row lengths around the SIMD widths."""
    generator = torch.Generator().manual_seed(10)
    x = (4 * torch.randn(33, n, generator=generator)).round().to(dtype)  # many ties
    special = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0], dtype=dtype)
    chosen = special[torch.randint(0, 5, x.shape, generator=generator)]
    x = torch.where(torch.rand(x.shape, generator=generator) < 0.2, chosen, x)
    torch.testing.assert_close(_sort_rows(x), x.sort(dim=-1).values, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_sort_rows(x.T), x.T.sort(dim=-1).values, rtol=0, atol=0, equal_nan=True)


class _Scores(torch.Tensor):
    """A plain tensor subclass: ``_sort_rows`` hands subclasses (like fake tensors) to torch.sort, not numpy."""


def test_the_torch_sort_path_gives_the_same_result():
    """Off CPU (and for tensor subclasses) the quantile sorts with torch.sort; a subclass runs that path here."""
    generator = torch.Generator().manual_seed(13)
    x = (2 * torch.randn(3, 4, 33, generator=generator)).round()  # ties
    mask = torch.rand(3, 1, 33, generator=generator) < 0.7
    rates = torch.rand(1, 4, 1, generator=generator)
    out = r_softmax(x.as_subclass(_Scores), rates, mask=mask)
    margin = r_softmax_margin(x.as_subclass(_Scores), rates, mask=mask)
    assert type(out) is _Scores and type(margin) is _Scores
    assert torch.equal(out.as_subclass(torch.Tensor), r_softmax(x, rates, mask=mask))
    assert torch.equal(margin.as_subclass(torch.Tensor), r_softmax_margin(x, rates, mask=mask))


# ---------------------------------------------------------------------------------------------------------------
# NaN scores (issue 10, item 11): a NaN at a valid position makes its whole row NaN, as torch.softmax does.


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_nan_at_a_valid_position_gives_a_nan_row_like_softmax(dtype, tol):
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(4, 10, generator=generator).to(dtype)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, 7:] = False
    x[1, 3] = math.nan  # valid: row 1 becomes NaN
    x[2, 8] = math.nan  # masked: ignored, as any content of a masked position
    grad = torch.randn(4, 10, generator=generator).to(dtype)
    out, expected, grad_x, expected_grad = _both_gradients(x, 0.5, mask, grad)
    assert torch.softmax(x[1], dim=-1).isnan().all()  # the convention followed
    assert out[1].isnan().all() and expected[1].isnan().all()
    assert RSoftmax.apply(x, r_softmax_margin(x, 0.5, mask=mask), mask)[1].isnan().all()
    assert r_softmax_margin(x, 0.5, mask=mask)[1].isnan().all()
    assert grad_x[1, :7].isnan().all() and expected_grad[1, :7].isnan().all()
    others = [0, 2, 3]
    assert not out[others].isnan().any() and not grad_x[others].isnan().any()
    torch.testing.assert_close(out[others], expected[others], rtol=tol, atol=tol)
    torch.testing.assert_close(grad_x[others], expected_grad[others], rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------------------------
# Gradient: the hand-derived VJP against finite differences and against autograd through the twin.


def away_from_kinks(x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """No tie for the maximum and no other valid entry within 1e-4 of the relu kink x = m - t, so finite
    differences stay on one smooth piece (the maximum itself sits at m - m + t = t whatever the perturbation)."""
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask
    scores = x.masked_fill(~valid, -math.inf)
    top2 = scores.topk(2, dim=-1).values  # (..., 2)
    others = valid & (scores < top2[..., :1])
    distinct_max = ((top2[..., 0] - top2[..., 1]) > 1e-4)[valid.sum(-1) > 1].all()
    return bool(distinct_max and ((x - top2[..., :1] + t).abs() > 1e-4)[others].all())


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_function_gradcheck_float64(masked):
    generator = torch.Generator().manual_seed(2)
    shape = (2, 3, 9)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = random_mask(shape, generator) if masked else None
    t = r_softmax_margin(x, 0.45, mask=mask)  # frozen margin: the Function treats it as a constant
    assert away_from_kinks(x, t, mask)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: RSoftmax.apply(x, t, mask), (x,), eps=1e-6, atol=1e-7)


def _both_gradients(x, r, mask, grad, **kwargs):
    x_ours, x_spec = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = r_softmax(x_ours, r, mask=mask, **kwargs)
    out_spec = _r_softmax_autograd(x_spec, r, mask, **kwargs)
    out_ours.backward(grad)
    out_spec.backward(grad)
    return out_ours, out_spec, x_ours.grad, x_spec.grad


RATE_CASES = {
    "r.5": lambda g: 0.5,
    "r0": lambda g: 0.0,
    "r1": lambda g: 1.0,
    "per-head": lambda g: torch.rand((1, 3, 1, 1), generator=g),
    "per-row": lambda g: torch.rand((2, 3, 5, 1), generator=g),
}


@pytest.mark.parametrize("values", ["continuous", "integer-ties", "neg-inf-keys"])
@pytest.mark.parametrize("rate", RATE_CASES.values(), ids=RATE_CASES.keys())
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_function_matches_autograd_twin(values, rate, dtype, tol):
    generator = torch.Generator().manual_seed(3)
    shape = (2, 3, 5, 11)  # B, H, T, S
    x = torch.randn(shape, generator=generator).to(dtype)
    if values == "integer-ties":
        x = (2 * x).round()  # ties, including ties for the maximum
    mask = random_mask(shape, generator)
    if values == "neg-inf-keys":
        x = x.masked_fill(torch.rand(shape, generator=generator) < 0.2, -math.inf)
    grad = torch.randn(shape, generator=generator).to(dtype)
    out, expected, grad_x, expected_grad = _both_gradients(x, rate(generator), mask, grad)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_x, expected_grad, rtol=tol, atol=tol)
    invalid = ~mask | (x == -math.inf)
    assert torch.all(grad_x[invalid] == 0)


def test_tied_maximum_sends_the_max_term_to_the_index_torch_max_returns():
    x = torch.tensor([[2.0, 2.0, 1.0, 0.5, 0.0]], dtype=torch.float64)
    grad = torch.tensor([[1.0, -2.0, 0.5, 3.0, 1.0]], dtype=torch.float64)
    out, expected, grad_x, expected_grad = _both_gradients(x, 0.5, None, grad)
    torch.testing.assert_close(grad_x, expected_grad, rtol=1e-12, atol=1e-12)
    # The two tied entries share p but not the gradient: only index 0 (torch.max's choice) carries the max term.
    assert out[0, 0] == out[0, 1] and grad_x[0, 0] != grad_x[0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_half_precision_gradient_equals_float32_gradient_cast(dtype):
    generator = torch.Generator().manual_seed(4)
    x = (8 * torch.randn(4, 32, generator=generator)).to(dtype)
    grad = torch.randn(4, 32, generator=generator).to(dtype)
    x_half, x_full = x.clone().requires_grad_(), x.float().requires_grad_()
    r_softmax(x_half, 0.5).backward(grad)
    r_softmax(x_full, 0.5).backward(grad.float())
    assert x_half.grad.dtype == dtype
    assert torch.equal(x_half.grad, x_full.grad.to(dtype))


# ---------------------------------------------------------------------------------------------------------------
# Masking: r counts valid keys only; masked keys are exactly the keys sliced off; empty rows give zeros.


@pytest.mark.parametrize("how", ["mask", "neg-inf", "mask-over-garbage"])
def test_masked_keys_give_the_result_of_slicing_them_off(how):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 16, generator=generator)
    mask = random_mask((6, 16), generator)[2:]  # rows 0-1 of random_mask are the special rows; keep random ones
    x = x[2:]
    rates = torch.rand(4, 1, generator=generator)
    if how == "mask":
        out = r_softmax(x, rates, mask=mask)
    elif how == "neg-inf":
        out = r_softmax(x.masked_fill(~mask, -math.inf), rates)
    else:  # padding may hold anything, even inf and NaN
        garbage = torch.tensor([math.inf, math.nan, 1e30, -1e30]).repeat(4)
        out = r_softmax(torch.where(mask, x, garbage), rates, mask=mask)
    for row in range(4):
        sliced = r_softmax(x[row][mask[row]], rates[row].item())
        assert torch.all(out[row][~mask[row]] == 0)
        assert torch.equal(out[row][mask[row]] == 0, sliced == 0)
        torch.testing.assert_close(out[row][mask[row]], sliced, rtol=1e-6, atol=1e-7)  # sums in another order


def test_padding_does_not_eat_into_the_rate():
    """8 real + 8 padded keys at r = 0.75: the official masking (masked -> row max) collapses to a one-hot."""
    real = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1, -0.4, 1.6, 0.0])
    x = torch.cat([real, torch.zeros(8)])
    mask = torch.arange(16) < 8
    out = r_softmax(x, 0.75, mask=mask)
    # r (k - 1) = 5.25 of the 8 real keys are zero: 6 of them, 2 survive (not 1, as in the official code).
    assert (out[:8] > 0).sum() == 2 and torch.all(out[8:] == 0)
    torch.testing.assert_close(out[:8], r_softmax(real, 0.75), rtol=0, atol=1e-7)


def test_fully_masked_row_gives_zeros_and_zero_gradient():
    x = torch.randn(3, 7, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1] = False
    scores = x.clone()
    scores.data[2] = -math.inf  # a row masked by an additive -inf mask
    out = r_softmax(scores, 0.5, mask=mask)
    out.backward(torch.randn(3, 7))
    assert torch.all(out[1:] == 0) and not out.isnan().any()
    assert torch.all(x.grad[1:] == 0) and not x.grad.isnan().any()
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------------------------
# Properties (hypothesis) on rows of distinct values spaced >= 0.01 (>> eps), so the threshold is unambiguous.

distinct_rows = st.lists(st.integers(-1000, 1000), min_size=1, max_size=24, unique=True).map(
    lambda ints: torch.tensor(ints, dtype=torch.float64) / 100
)
rates = st.floats(0.0, 1.0)


@settings(max_examples=150, deadline=None)
@given(row=distinct_rows, r=rates)
def test_property_distribution_and_zero_count(row, r):
    """Zeros are exactly the valid entries <= q_r - eps. Sorted x_(0) < ... < x_(k-1), position r (k - 1):
    entries below x_(floor) are zero, entries above x_(ceil) survive, and with gaps >> eps the entry at the
    position survives when it is an order statistic (weight eps) and may go either way between two. Hence
    floor(r (k - 1)) <= #zeros <= ceil(r (k - 1)) in float64. In float32 eps is lost in rounding, so an entry at
    (or within rounding of) q_r can vanish too: floor(r (k - 1)) <= #zeros <= min(ceil(r (k - 1)) + 1, k - 1)."""
    k = row.numel()
    position = r * (k - 1)
    for dtype, upper in ((torch.float64, math.ceil(position)), (torch.float32, min(math.ceil(position) + 1, k - 1))):
        x = row.to(dtype)
        out = r_softmax(x, r)
        assert torch.all(out >= 0)
        torch.testing.assert_close(out.sum(), torch.tensor(1.0, dtype=dtype))
        assert out[x.argmax()] > 0  # the row maximum survives
        zeros = int((out == 0).sum())
        assert math.floor(position) <= zeros <= upper
        # the zeros are the smallest entries: the support is {x >= smallest surviving value}
        assert torch.equal(out > 0, x >= x[out > 0].min())


@settings(max_examples=100, deadline=None)
@given(row=distinct_rows, r=rates, shift=st.floats(-100.0, 100.0))
def test_property_shift_invariance(row, r, shift):
    torch.testing.assert_close(r_softmax(row + shift, r), r_softmax(row, r), rtol=0, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(row=distinct_rows, r=rates, padding=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8))
def test_property_mask_invariance(row, r, padding):
    x = torch.cat([row, torch.tensor(padding, dtype=torch.float64)])
    mask = torch.arange(x.numel()) < row.numel()
    out = r_softmax(x, r, mask=mask)
    assert torch.all(out[row.numel() :] == 0)
    torch.testing.assert_close(out[: row.numel()], r_softmax(row, r), rtol=0, atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(row=distinct_rows)
def test_property_rate_one_is_one_hot_on_argmax(row):
    assert torch.equal(r_softmax(row, 1.0), torch.nn.functional.one_hot(row.argmax(), row.numel()).to(row.dtype))


def test_rate_one_ties_share_and_rate_zero_is_not_softmax():
    torch.testing.assert_close(r_softmax(torch.tensor([1.0, 3.0, 3.0, 2.0]), 1.0), torch.tensor([0, 0.5, 0.5, 0]))
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    out = r_softmax(x, 0.0)  # q_0 = min: weights [eps, 1 + eps, 2 + eps] reshape the distribution
    assert torch.all(out > 0)
    assert not torch.allclose(out, torch.softmax(x, -1), atol=1e-3)
    # In float32 eps is lost next to m - q_0 = 2, so even r = 0 zeroes the minimum (as the official code does).
    assert r_softmax(x.float(), 0.0)[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# Broadcasting of r and dim.


def test_per_head_and_per_row_rates_equal_row_by_row_calls():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 4, 10, generator=generator)  # B, H, T, S
    mask = torch.rand(2, 1, 4, 10, generator=generator) < 0.8  # [B, 1, T, S] padding-style mask
    heads = torch.tensor([0.2, 0.5, 0.9])
    out = r_softmax(x, heads.view(1, 3, 1, 1), mask=mask)
    torch.testing.assert_close(out, r_softmax(x, heads.view(3, 1, 1), mask=mask), rtol=0, atol=0)
    for head in range(3):
        torch.testing.assert_close(out[:, head], r_softmax(x[:, head], heads[head].item(), mask=mask[:, 0]))
    rows = torch.rand(2, 3, 4, 1, generator=generator)
    out = r_softmax(x, rows, mask=mask)
    for b, h, t in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(4)).tolist():
        torch.testing.assert_close(out[b, h, t], r_softmax(x[b, h, t], rows[b, h, t].item(), mask=mask[b, 0, t]))


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_dim_other_than_last(dim):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(5, 6, 7, generator=generator)
    row_shape = list(x.shape)
    row_shape[dim] = 1
    rates = torch.rand(row_shape, generator=generator)
    mask = torch.rand(x.shape, generator=generator) < 0.8
    out = r_softmax(x, rates, dim=dim, mask=mask)
    expected = r_softmax(x.movedim(dim, -1), rates.movedim(dim, -1), mask=mask.movedim(dim, -1)).movedim(-1, dim)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert r_softmax_margin(x, rates, dim=dim, mask=mask).shape == tuple(row_shape)


# ---------------------------------------------------------------------------------------------------------------
# Validation at the public boundary.

BAD_ARGUMENTS = {
    "r-negative": (dict(r=-0.1), ValueError, r"^r must lie in \[0, 1\]"),
    "r-above-one": (dict(r=1.5), ValueError, r"^r must lie in \[0, 1\]"),
    "r-nan": (dict(r=math.nan), ValueError, r"^r must lie in \[0, 1\]"),
    "r-tensor-nan": (dict(r=torch.tensor([[0.5], [math.nan]])), ValueError, r"^r must lie in \[0, 1\]"),
    "r-tensor-above-one": (dict(r=torch.tensor([[0.5], [2.0]])), ValueError, r"^r must lie in \[0, 1\]"),
    "r-tensor-not-keepdim": (dict(r=torch.full((2, 4), 0.5)), ValueError, r"^r of shape \(2, 4\) must broadcast"),
    "r-bool": (dict(r=True), TypeError, r"^r must be a number"),
    "r-string": (dict(r="0.5"), TypeError, r"^r must be a number"),
    "r-bool-tensor": (dict(r=torch.tensor(True)), TypeError, r"^r must be a real"),
    "mask-float": (dict(mask=torch.ones(2, 4)), TypeError, r"^mask must be a bool tensor"),
    "mask-shape": (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"^mask of shape \(3, 4\)"),
    "eps-zero": (dict(eps=0.0), ValueError, r"^eps must be"),
    "dim-out-of-range": (dict(dim=2), ValueError, r"^dim must be"),
    "x-integer": (dict(x=torch.ones(2, 4, dtype=torch.long)), TypeError, r"^x must be a floating-point"),
}


@pytest.mark.parametrize(("overrides", "error", "message"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_naming_the_argument(overrides, error, message):
    arguments = dict(x=torch.randn(2, 4), r=0.5) | overrides
    x, r = arguments.pop("x"), arguments.pop("r")
    with pytest.raises(error, match=message):
        r_softmax(x, r, **arguments)
    with pytest.raises(error, match=message):
        r_softmax_margin(x, r, **arguments)


# ---------------------------------------------------------------------------------------------------------------
# Half precision and long rows.

HALF_ROWS = {
    # Well separated: every entry is within 8 of the maximum (e^-8 is representable in fp16) or so far below
    # that exp underflows to exactly 0 in float32 as well. 6e4 - (-6e4) would overflow fp16 arithmetic.
    "fp16-1e4": (torch.float16, [[1e4, 9992.0, 9000.0, 5000.0, 0.0, -1e4], [6e4, -6e4, 0.0, 3e4, 1.0, -3e4]]),
    "bf16-1e30": (torch.bfloat16, [[1e4, 9984.0, 9920.0, -1e4, 9856.0, 9728.0], [3e30, -3e30, 0.0, 1e30, 1.0, -2e30]]),
}


@pytest.mark.parametrize("r", [0.0, 0.5, 0.8], ids=lambda r: f"r{r}")
@pytest.mark.parametrize(("dtype", "rows"), HALF_ROWS.values(), ids=HALF_ROWS.keys())
def test_half_precision_large_magnitudes(dtype, rows, r):
    x = torch.tensor(rows, dtype=dtype)
    out = r_softmax(x, r)
    reference = r_softmax(x.float(), r)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out == 0, reference == 0)
    assert torch.equal(out, reference.to(dtype))  # computed in float32, then cast
    torch.testing.assert_close(out.float().sum(-1), torch.ones(2), rtol=0, atol=1e-2)


@pytest.mark.parametrize("shape", [(2, 4, 16384), (1, 1, 65536)], ids=["B2-H4-S16384", "B1-H1-S65536"])
def test_long_rows_sum_to_one_with_the_requested_sparsity(shape):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(shape, generator=generator).requires_grad_()
    out = r_softmax(x, 0.9)
    out.backward(torch.randn(shape, generator=generator))
    torch.testing.assert_close(out.sum(-1), torch.ones(shape[:-1]))
    zeros = (out == 0).sum(-1)
    position = 0.9 * (shape[-1] - 1)
    assert torch.all((zeros >= math.floor(position)) & (zeros <= math.ceil(position) + 1))
    assert torch.isfinite(x.grad).all()


def full_size_allocations(fn, nbytes: int) -> list[str]:
    """Operators that allocated at least ``nbytes`` (net) while ``fn`` ran."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name != "[memory]" and e.self_cpu_memory_usage >= nbytes]


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_input_is_untouched_and_full_size_temporaries_are_few(masked):
    """On CPU the op is bound by memory traffic, and each fresh buffer costs page faults, so the buffer count is part
    of the design: the forward allocates the masked scores and the sorted copy, which then receives ``p``; the
    backward three buffers, the first of which becomes ``dx``. The work in place must never touch the input."""
    generator = torch.Generator().manual_seed(12)
    shape = (64, 512)
    x = torch.randn(shape, generator=generator, requires_grad=True)
    mask = torch.rand(shape, generator=generator) < 0.9 if masked else None
    grad = torch.randn(shape, generator=generator)
    before = x.detach().clone()
    out = {}

    def forward() -> None:
        out["p"] = r_softmax(x, 0.5, mask=mask)

    nbytes = x.numel() * x.element_size()
    assert len(full_size_allocations(forward, nbytes)) == 2
    assert len(full_size_allocations(lambda: out["p"].backward(grad), nbytes)) == 3
    assert torch.equal(x.detach(), before)
    torch.testing.assert_close(out["p"], _r_softmax_autograd(before, 0.5, mask))


def test_memory_is_linear_in_the_row_length():
    """No N x N intermediate: the largest allocation of forward + backward on one row of N = 16384 stays under
    64 bytes per entry (a quadratic one would take 1 GiB)."""
    n = 16384
    x = torch.randn(1, 1, n, requires_grad=True)
    mask = torch.rand(1, 1, n) < 0.9
    grad = torch.randn(1, 1, n)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        r_softmax(x, 0.5, mask=mask).backward(grad)
    assert max(event.cpu_memory_usage for event in prof.events()) <= 64 * n


def test_docstring_examples():
    # import_module: the package attribute ``hf_sparse_attn.ops.r_softmax`` is the function, not the module
    results = doctest.testmod(importlib.import_module("hf_sparse_attn.ops.r_softmax"))
    assert results.attempted > 0 and results.failed == 0
