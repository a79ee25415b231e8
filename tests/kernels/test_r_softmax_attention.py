"""The Triton r-softmax attention kernel against its reference twin, forward and backward.

The reference is the specification: scores ``scale q k^T`` in fp32, :func:`hf_sparse_attn.ops.r_softmax` over the
valid keys, ``@ v``, gradients by autograd through it. Thresholds are also checked bit for bit against
``r_softmax_margin`` (torch's sort-based quantile) on inputs whose scores are exact in fp32, which makes the
kernel's blockwise search and the sort two independent algorithms for the same order statistics.

Without CUDA the kernels run on Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before Triton is
imported), so shapes stay tiny; the ``gpu``-marked test repeats the comparison
at realistic sizes on CUDA.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
import triton_interpreter  # noqa: F401  (before Triton loads: its CPU interpreter without CUDA; skip without Triton)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_sparse_attn.kernels import r_softmax_attention, tuning
from hf_sparse_attn.kernels import r_softmax_attention_triton as kernels
from hf_sparse_attn.kernels import r_softmax_threshold_triton as threshold_module
from hf_sparse_attn.kernels.r_softmax_attention_triton import (
    RSoftmaxAttentionFunction,
    dropout_keep_mask,
    r_softmax_attention_bwd,
    r_softmax_attention_fwd,
)
from hf_sparse_attn.kernels.r_softmax_threshold_triton import r_softmax_threshold
from hf_sparse_attn.ops.r_softmax import r_softmax, r_softmax_margin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-8
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MASKS = ("none", "padding", "causal", "causal-padding")


@pytest.fixture(autouse=True)
def nan_allocations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill the kernels' fresh allocations with NaN (ints with INT_MIN), so a value never written fails loudly."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_floating_point():
            return tensor.fill_(float("nan"))
        return tensor.fill_(torch.iinfo(tensor.dtype).min) if tensor.dtype != torch.bool else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(empty_like(*args, **kwargs)))


def make_masks(batch: int, t_len: int, s_len: int, kind: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(key_padding [B, S] or None, valid [B, 1, T, S] or None)`` for a mask kind of :data:`MASKS`.

    Batch row ``b`` loses its last ``3 (b + 1)`` keys to padding; causal aligns queries to the end of the keys."""
    key_padding = None
    valid = torch.ones(batch, 1, t_len, s_len, dtype=torch.bool, device=DEVICE)
    if "padding" in kind:
        key_padding = torch.ones(batch, s_len, dtype=torch.bool, device=DEVICE)
        for row in range(batch):
            key_padding[row, s_len - 3 * (row + 1) :] = False
        valid &= key_padding[:, None, None, :]
    if "causal" in kind:
        valid &= torch.ones(t_len, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - t_len)
    return key_padding, None if kind == "none" else valid


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, rate: torch.Tensor, scale: float
) -> torch.Tensor:
    """``r_softmax(scale q k^T) v`` in fp32 as ``[B, T, H, D]``: the specification."""
    scores = q.float() @ k.float().transpose(-1, -2) * scale  # (B, H, T, S)
    probs = r_softmax(scores, rate.view(1, -1, 1, 1), mask=valid, eps=EPS)
    return (probs @ v.float()).transpose(1, 2)  # (B, T, H, D)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str) -> None:
    """Max-norm error relative to the larger of 1 and the expected tensor's max magnitude (gradients of r-softmax
    scale with 1 / (sum of weights), which is large when few keys survive)."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= tol * scale, f"{name}: max abs error {error:.3e} > {tol:.0e} x {scale:.3e}"


def assert_matches_reference(
    out: torch.Tensor,
    expected: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    reference_inputs: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
    tol: float,
) -> tuple[torch.Tensor, ...]:
    """The kernel's output and its ``q``, ``k``, ``v`` gradients (inputs' dtype) against the reference's, for the same
    upstream gradient ``grad``; returns the kernel's gradients."""
    grads = torch.autograd.grad(out, inputs, grad)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad.float())
    assert_close(out, expected, tol, "output")
    for name, actual, wanted, leaf in zip(("dq", "dk", "dv"), grads, expected_grads, inputs, strict=True):
        assert actual.dtype == leaf.dtype
        assert_close(actual, wanted, tol, name)
    return grads


def run_case(
    batch: int,
    heads: int,
    t_len: int,
    s_len: int,
    head_dim: int,
    kind: str,
    rates: list[float],
    dtype: torch.dtype,
    blocks: tuple[int, int] | None = None,
) -> None:
    """Kernel vs reference on output and dq, dk, dv for the same random upstream gradient."""
    generator = torch.Generator().manual_seed(t_len * 1000 + s_len)
    q, k, v = (
        torch.randn(batch, heads, n, head_dim, generator=generator).to(DEVICE, dtype).requires_grad_()
        for n in (t_len, s_len, s_len)
    )
    rate = torch.tensor(rates, dtype=torch.float32, device=DEVICE).expand(heads).contiguous()
    key_padding, valid = make_masks(batch, t_len, s_len, kind)
    scale = head_dim**-0.5
    out = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, "causal" in kind, scale, EPS, blocks)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE, dtype)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = reference(q32, k32, v32, valid, rate, scale)
    assert out.dtype == dtype and out.shape == (batch, t_len, heads, head_dim)
    assert_matches_reference(out, expected, (q, k, v), (q32, k32, v32), grad, TOLERANCE[dtype])


CASES = [
    # B, H, T, S, D, mask, rates, dtype
    (1, 2, 16, 16, 16, "none", [0.5], torch.float32),
    (2, 2, 33, 33, 32, "padding", [0.25, 0.9], torch.float32),
    (1, 2, 64, 64, 16, "causal", [0.5], torch.float32),
    (1, 2, 16, 33, 16, "causal", [0.25, 0.9], torch.float32),
    (2, 1, 33, 64, 32, "causal-padding", [0.9], torch.float32),
    (1, 2, 33, 33, 16, "none", [0.0, 1.0], torch.float32),
    (2, 3, 40, 40, 16, "padding", [0.95, 0.99, 1.0], torch.float32),
    (2, 2, 33, 33, 32, "padding", [0.25, 0.9], torch.bfloat16),
    (1, 2, 64, 64, 16, "causal-padding", [0.5], torch.bfloat16),
    (1, 2, 64, 64, 16, "causal-padding", [0.5], torch.float16),
]


def case_id(case: tuple) -> str:
    batch, heads, t_len, s_len, head_dim, kind, rates, dtype = case
    rate_id = ",".join(f"{r:g}" for r in rates)
    return f"B{batch}-H{heads}-T{t_len}-S{s_len}-D{head_dim}-{kind}-r{rate_id}-{DTYPE_IDS[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(case: tuple) -> None:
    run_case(*case)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=lambda b: f"BM{b[0]}-BN{b[1]}")
def test_matches_reference_across_blocks(blocks: tuple[int, int]) -> None:
    """Several row and key blocks, partial last blocks, and causal block bounds with a KV offset."""
    run_case(1, 2, 33, 47, 16, "causal-padding", [0.25, 0.75], torch.float32, blocks)


def test_rows_without_valid_keys_give_zeros() -> None:
    """A fully padded batch row and causal rows before the first key (T > S): zero output and zero gradients."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator).to(DEVICE).requires_grad_() for n in (24, 16, 16))
    key_padding = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    key_padding[1] = False
    rate = torch.tensor([0.5, 0.5], device=DEVICE)
    out = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, True, 0.25, EPS)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert (out[0, :8] == 0).all() and (dq[0, :, :8] == 0).all()  # query i sees keys j <= i - 8
    assert (out[0, 8:] != 0).any(dim=-1).all()


def exact_scores(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [1, 5, T, D]``, ``k [1, 5, S, D]`` whose scores (scale 1) are exact in fp32 in any summation order."""
    t_len, s_len, head_dim = 24, 40, 16
    if kind == "ties":  # small integers: scores in [-36, 36], many ties
        q = torch.randint(-3, 4, (1, 5, t_len, head_dim), generator=generator)
        k = torch.randint(-1, 2, (1, 5, s_len, head_dim), generator=generator)
    elif kind == "distinct":  # mostly distinct integers below 2^24
        q = torch.randint(-50, 51, (1, 5, t_len, head_dim), generator=generator)
        k = torch.randint(-1000, 1001, (1, 5, s_len, head_dim), generator=generator)
    else:  # "geometric": one product per score, values 2^-j spread over 40 binades, which stalls value search
        q = torch.zeros(1, 5, t_len, head_dim)
        q[..., 0] = torch.randint(1, 3, (1, 5, t_len), generator=generator) * 2.0 - 3.0  # -1 or 1
        k = torch.zeros(1, 5, s_len, head_dim)
        k[..., 0] = 2.0 ** -torch.randperm(s_len, generator=generator).float()
    return q.float().to(DEVICE), k.float().to(DEVICE)


@pytest.mark.parametrize("mask", ["none", "causal-padding"])
@pytest.mark.parametrize("kind", ["ties", "distinct", "geometric"])
def test_threshold_is_the_exact_quantile(kind: str, mask: str) -> None:
    """The margin ``t = m - q_r + eps`` found by the blockwise search equals torch's sort-based one bit for bit,
    as do the row maximum and its (first) index, for rates 0, 0.25, 0.5, 0.9 and 1 (one per head)."""
    generator = torch.Generator().manual_seed(1)
    q, k = exact_scores(kind, generator)
    rate = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], device=DEVICE)
    key_padding, valid = make_masks(1, q.shape[2], k.shape[2], mask)
    _, (row_max, margin, _, argmax, _), _ = r_softmax_attention_fwd(
        q, k, k, key_padding, rate, mask != "none", 1.0, EPS
    )

    scores = q @ k.transpose(-1, -2)  # (1, 5, T, S), exact
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand_as(scores)
    expected = r_softmax_margin(scores, rate.view(1, -1, 1, 1), mask=valid, eps=EPS).squeeze(-1)
    top = scores.masked_fill(~valid, float("-inf")).max(dim=-1)
    torch.testing.assert_close(margin, expected, atol=0, rtol=0)
    torch.testing.assert_close(row_max, top.values, atol=0, rtol=0)
    assert torch.equal(argmax.long(), top.indices)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kind", ["padding", "causal-padding"])
def test_matches_reference_on_gpu(kind: str, head_dim: int, dtype: torch.dtype) -> None:
    run_case(2, 4, 500, 1037 if kind == "causal-padding" else 500, head_dim, kind, [0.25, 0.5, 0.75, 0.9], dtype)
    run_case(2, 4, 1024, 1024, head_dim, kind, [0.5], dtype)


def test_kernel_module_is_used_through_the_dispatcher() -> None:
    """``backend='triton'`` runs this kernel (on CPU through the interpreter) on the mask structure the model passes
    (key padding + causal offset ``S - T``) and on q, k, v laid out as transformers makes them: ``[B, T, H, D]``
    projections viewed as ``[B, H, T, D]``; the reference gets the same mask materialised."""
    generator = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, n, 2, 16, generator=generator).to(DEVICE).requires_grad_() for n in (20, 36, 36)]
    q, k, v = (leaf.transpose(1, 2) for leaf in leaves)  # (B, H, T or S, D), not contiguous
    key_padding, valid = make_masks(2, 20, 36, "causal-padding")
    rate = torch.tensor([0.3, 0.7], device=DEVICE)
    out, weights = r_softmax_attention(q, k, v, None, rate, key_padding=key_padding, causal_offset=16, backend="triton")
    expected, _ = r_softmax_attention(q, k, v, valid, rate, backend="reference")
    assert weights is None
    assert out.grad_fn is not None and "RSoftmaxAttentionFunction" in type(out.grad_fn).__name__
    assert_close(out, expected, 1e-4, "output")
    grads = torch.autograd.grad(out.sum(), leaves)  # a stride-0 upstream gradient
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected_grads, strict=True):
        assert_close(actual, wanted, 1e-4, name)


def on_grid(x: torch.Tensor, step: float) -> torch.Tensor:
    """``x`` rounded to multiples of ``step`` (a power of 2): dot products of such values are exact in fp32."""
    return (x / step).round() * step


@pytest.mark.parametrize("dist", ["gaussian", "lognormal"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_threshold_search_takes_few_passes(dist: str, causal: bool) -> None:
    """The instrumented pass counter (the block's slowest row decides it, the first pass is also the max/count
    pass): at most 5 passes per row block on average at rates 0.25 / 0.5 / 0.9 (issue 13), with thresholds still
    bit for bit those of the sort. Scores are exact in fp32 (values on a grid), so both see the same numbers."""
    generator = torch.Generator().manual_seed(3)
    t_len = s_len = 256
    if dist == "gaussian":
        q = on_grid(torch.randn(1, 3, t_len, 64, generator=generator), 2.0**-5)
        k = on_grid(torch.randn(1, 3, s_len, 64, generator=generator), 2.0**-5)
        scale = 0.125
    else:  # skewed: each row is a log-normal sample (q one-hot, so the scores are k's entries)
        k = on_grid(torch.randn(1, 3, s_len, 16, generator=generator).exp(), 2.0**-12)
        q = torch.nn.functional.one_hot(torch.randint(16, (1, 3, t_len), generator=generator), 16).float()
        scale = 1.0
    q, k = q[:, :, -128:].contiguous().to(DEVICE), k.to(DEVICE)  # the last 128 rows: 2 blocks per head
    rate = torch.tensor([0.25, 0.5, 0.9], device=DEVICE)
    found = r_softmax_threshold(q, k, None, rate, causal, scale, EPS)
    row_max, margin, passes = found.row_max, found.margin, found.passes

    scores = q @ k.transpose(-1, -2) * scale  # (1, 3, 128, S), exact
    valid = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        valid &= torch.ones(128, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - 128)
    expected = r_softmax_margin(scores, rate.view(1, -1, 1, 1), mask=valid, eps=EPS).squeeze(-1)
    torch.testing.assert_close(margin, expected, atol=0, rtol=0)
    torch.testing.assert_close(row_max, scores.masked_fill(~valid, float("-inf")).amax(-1), atol=0, rtol=0)
    assert passes.shape == (3, 2) and passes.dtype == torch.int32
    assert passes.min().item() >= 1
    assert passes.float().mean().item() <= 5.0, passes


@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_score_gives_nan_row(where: str) -> None:
    """A NaN among a row's valid scores makes that output row NaN, as softmax, SDPA and the reference do (issue
    10 item 11); a NaN in a query touches its row only, a NaN in a key every row of its head. Other rows and the
    other head match the reference."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator).to(DEVICE) for n in (20, 24, 24))
    if where == "query":
        q[0, 0, 5, 3] = float("nan")
    else:
        k[0, 0, 7, 3] = float("nan")
    rate = torch.tensor([0.5, 0.5], device=DEVICE)
    out = RSoftmaxAttentionFunction.apply(q, k, v, None, rate, False, 0.25, EPS)  # (B, T, H, D)
    nan_rows = torch.zeros(20, 2, dtype=torch.bool, device=DEVICE)
    nan_rows[5 if where == "query" else slice(None), 0] = True
    assert torch.isnan(out[0][nan_rows]).all()
    assert torch.isfinite(out[0][~nan_rows]).all()
    expected = reference(q, k, v, None, rate, 0.25)
    assert_close(out[0][~nan_rows], expected[0][~nan_rows], TOLERANCE[torch.float32], "finite rows")


@pytest.mark.parametrize("kind", ["padding", "causal"])
def test_dropout_matches_the_reference_with_the_same_mask(kind: str) -> None:
    """Attention dropout inside the kernel: for a seed, the output and q/k/v gradients equal the reference's with
    the mask :func:`dropout_keep_mask` draws (so the reference reproduces the kernel's mask exactly); the mask keeps
    a fraction 1 - p of the scores; the same seed gives the same result, another seed another one."""
    p_drop, seed = 0.3, 1234
    generator = torch.Generator().manual_seed(5)
    batch, heads, t_len, s_len = 2, 2, 40, 48
    q, k, v = (
        torch.randn(batch, heads, n, 16, generator=generator).to(DEVICE).requires_grad_() for n in (t_len, s_len, s_len)
    )
    rate = torch.tensor([0.25, 0.5], device=DEVICE)
    key_padding, valid = make_masks(batch, t_len, s_len, "causal-padding" if kind == "causal" else kind)
    out = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, kind == "causal", 0.25, EPS, None, p_drop, seed)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE)
    keep = dropout_keep_mask(seed, p_drop, batch, heads, t_len, s_len, DEVICE)  # (B, H, T, S)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    probs = r_softmax(q32 @ k32.transpose(-1, -2) * 0.25, rate.view(1, -1, 1, 1), mask=valid, eps=EPS)
    expected = ((probs * keep / (1 - p_drop)) @ v32).transpose(1, 2)  # (B, T, H, D)
    assert_matches_reference(out, expected, (q, k, v), (q32, k32, v32), grad, TOLERANCE[torch.float32])

    kept = keep.float().mean().item()  # B H T S = 7680 Bernoulli(0.7) draws: 5 standard deviations
    assert abs(kept - (1 - p_drop)) <= 5 * ((p_drop * (1 - p_drop)) / keep.numel()) ** 0.5
    again = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, kind == "causal", 0.25, EPS, None, p_drop, seed)
    other = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, kind == "causal", 0.25, EPS, None, p_drop, 7)
    assert torch.equal(again, out) and not torch.equal(other, out)
    assert not torch.equal(dropout_keep_mask(7, p_drop, batch, heads, t_len, s_len, DEVICE), keep)


def test_dead_tiles_next_to_live_ones() -> None:
    """A key block whose every score is below every row's threshold (the kernels skip its ``P V`` and backward
    products) between live blocks: output and gradients still match the reference."""
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator) for n in (32, 64, 64))
    q[..., 0] = 4.0
    k[..., 0] = 2.0
    k[:, :, 16:32, 0] = -12.0  # keys 16..31: scores ~ -12 against ~ +2 elsewhere, the 16 lowest of every row
    q, k, v = (x.to(DEVICE).requires_grad_() for x in (q, k, v))
    rate = torch.tensor([0.25, 0.5], device=DEVICE)
    probs = r_softmax(q @ k.transpose(-1, -2) * 0.25, rate.view(1, -1, 1, 1), eps=EPS)
    assert (probs[..., 16:32] == 0).all() and (probs[..., :16] > 0).any(
        -1
    ).all()  # the block is dead, its neighbours not
    out = RSoftmaxAttentionFunction.apply(q, k, v, None, rate, False, 0.25, EPS, (16, 16))
    grad = torch.randn(out.shape, generator=generator).to(DEVICE)
    expected = reference(q, k, v, None, rate, 0.25)
    _, dk, dv = assert_matches_reference(out, expected, (q, k, v), (q, k, v), grad, TOLERANCE[torch.float32])
    assert (dk[:, :, 16:32] == 0).all() and (dv[:, :, 16:32] == 0).all()

    # the threshold kernel's bitmask marks the block dead where the quantile lies above it (r = 0.5; at r = 0.25 the
    # quantile is next to the block's largest score and the bound may keep it), its neighbours live
    _, stats, tile = r_softmax_attention_fwd(*(x.detach() for x in (q, k, v)), None, rate, False, 0.25, EPS, 16, 16)
    live = stats[4]  # (B, H, T / 16, S / 16)
    assert tile == (16, 16) and live.shape == (1, 2, 2, 4)
    assert (live.bool() | ~exact_live_tiles(probs, 16, 16)).all()
    assert (live[0, 1, :, 1] == 0).all() and (live[..., [0, 2, 3]] == 1).all()


def bf16_inputs(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 ``q [1, 3, 48, 32]``, ``k, v [1, 3, 48, 32]``: ``peaky`` rows (one key far above the rest),
    ``duplicates`` (every key appears three times: tied scores)."""
    q, k, v = (torch.randn(1, 3, 48, 32, generator=generator) for _ in range(3))
    if kind == "peaky":
        q = q * 3.0
        k[:, :, 0] = q.mean(2) * 2.0  # key 0 aligns with the average query
    else:
        k, v = k[:, :, :16].repeat(1, 1, 3, 1), v[:, :, :16].repeat(1, 1, 3, 1)
    return tuple(x.to(DEVICE, torch.bfloat16) for x in (q, k, v))


@pytest.mark.parametrize("rates", [[0.25, 0.5, 0.9], [0.95, 0.99, 1.0]], ids=["r0.25-0.9", "r0.95-1"])
@pytest.mark.parametrize("kind", ["peaky", "duplicates"])
def test_bf16_error_at_most_twice_a_bf16_reference(kind: str, rates: list[float]) -> None:
    """FlashAttention's criterion: against the float64 reference on the same bf16 inputs, the kernel's error in
    the output and in dq, dk, dv is at most twice that of the reference computed in bf16 (bf16 scores and
    products), plus one bf16 rounding of the largest value. Peaky rows and rates near 1 make ``Z`` small and the
    argmax term of the gradient large; duplicate keys tie at the threshold."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = bf16_inputs(kind, generator)
    rate = torch.tensor(rates, device=DEVICE)
    scale = 32**-0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = RSoftmaxAttentionFunction.apply(*leaves, None, rate, False, scale, EPS)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE, torch.bfloat16)
    results = {"kernel": (out, *torch.autograd.grad(out, leaves, grad))}
    for name, dtype in (("truth", torch.float64), ("bf16", torch.bfloat16)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        scores = leaves[0] @ leaves[1].transpose(-1, -2) * scale  # (1, 3, T, S) in that dtype
        probs = r_softmax(scores, rate.view(1, -1, 1, 1).to(dtype), eps=EPS)
        expected = (probs @ leaves[2]).transpose(1, 2)  # (B, T, H, D)
        results[name] = (expected, *torch.autograd.grad(expected, leaves, grad.to(dtype)))
    for index, name in enumerate(("output", "dq", "dk", "dv")):
        truth = results["truth"][index]
        error = (results["kernel"][index].double() - truth).abs().max().item()
        reference_error = (results["bf16"][index].double() - truth).abs().max().item()
        bound = 2 * reference_error + 2.0**-8 * truth.abs().max().item()
        assert error <= bound, (
            f"{name}: kernel error {error:.3e} > 2 x bf16 reference error {reference_error:.3e} + ulp"
        )


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    s_len=st.integers(1, 80),
    spread=st.sampled_from([1, 3, 1000]),
    rates=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=2),
    causal=st.booleans(),
    padded=st.booleans(),
)
def test_threshold_is_exact_for_any_scores(
    seed: int, s_len: int, spread: int, rates: list[float], causal: bool, padded: bool
) -> None:
    """Property: for any row length, rate, tie pattern (integer scores from a narrow or a wide range), padding and
    causality, the search returns the sort's margin and maximum bit for bit, within its pass cap."""
    generator = torch.Generator().manual_seed(seed)
    t_len = 20
    q = torch.randint(-2, 3, (1, 2, t_len, 16), generator=generator).float().to(DEVICE)
    k = torch.randint(-spread, spread + 1, (1, 2, s_len, 16), generator=generator).float().to(DEVICE)
    key_padding = torch.rand(1, s_len, generator=generator).to(DEVICE) < 0.8 if padded else None
    rate = torch.tensor(rates, device=DEVICE)
    found = r_softmax_threshold(q, k, key_padding, rate, causal, 1.0, EPS, block_m=16, block_n=16)
    row_max, margin, passes = found.row_max, found.margin, found.passes

    scores = q @ k.transpose(-1, -2)  # (1, 2, T, S), exact integers
    valid = torch.ones_like(scores, dtype=torch.bool)
    if padded:
        valid &= key_padding[:, None, None, :]
    if causal:
        valid &= torch.ones(t_len, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - t_len)
    expected = r_softmax_margin(scores, rate.view(1, -1, 1, 1), mask=valid, eps=EPS).squeeze(-1)
    has_valid = valid.any(-1)
    top = torch.where(has_valid, scores.masked_fill(~valid, float("-inf")).amax(-1), 0.0)
    torch.testing.assert_close(margin, expected, atol=0, rtol=0)
    torch.testing.assert_close(row_max, top, atol=0, rtol=0)
    assert passes.max().item() < 64


class LaunchSpy:
    """Stands in for a Triton kernel (``kernel[grid](*args, **kwargs)``), runs it and keeps each launch's
    arguments by name."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid: tuple[int, ...]):
        def launch(*args: object, **kwargs: object) -> None:
            self.kernel[grid](*args, **kwargs)
            self.launches.append(dict(zip(self.kernel.arg_names, args, strict=False), **kwargs))

        return launch


def backward_inputs(t_len: int, s_len: int) -> tuple[torch.Tensor, ...]:
    """Leaves q ``[2, 2, T, 16]``, k, v ``[2, 2, S, 16]`` and an upstream gradient ``[2, T, 2, 16]``."""
    generator = torch.Generator().manual_seed(t_len * 100 + s_len)
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator).to(DEVICE).requires_grad_() for n in (t_len, s_len, s_len))
    grad = torch.randn(2, t_len, 2, 16, generator=generator).to(DEVICE)
    return q, k, v, grad


@pytest.mark.parametrize(("t_len", "s_len", "causal"), [(33, 47, True), (40, 24, True), (33, 47, False)])
def test_deterministic_backward_repeats_bit_for_bit_in_key_block_order(
    monkeypatch: pytest.MonkeyPatch, t_len: int, s_len: int, causal: bool
) -> None:
    """Deterministic mode (the default): two backward passes give bit-identical dq, dk, dv, and each row block's
    ordering counter ends at the number of key blocks that visited it: the key blocks a row of the (full) block may
    see, every one of them when not causal, none for blocks before the first key (T > S, causal)."""
    spy = LaunchSpy(kernels._bwd_kernel)
    monkeypatch.setattr(kernels, "_bwd_kernel", spy)
    q, k, v, grad = backward_inputs(t_len, s_len)
    key_padding, _ = make_masks(2, t_len, s_len, "padding")
    rate = torch.tensor([0.25, 0.75], device=DEVICE)
    block_m, block_n = 16, 16
    runs = []
    for _ in range(2):
        out = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, causal, 0.25, EPS, (block_m, block_n))
        runs.append(torch.autograd.grad(out, (q, k, v), grad))
    for first, second in zip(*runs, strict=True):
        assert torch.isfinite(first).all() and torch.equal(first, second)

    launch = spy.launches[-1]
    assert launch["DETERMINISTIC"] is True and launch["HAS_LIVE"] is True
    row_blocks = math.ceil(t_len / block_m)
    rows = torch.arange(row_blocks * block_m).view(row_blocks, block_m)
    first_keys = torch.arange(0, s_len, block_n)  # of each key block
    if causal:  # key block n visits a row block where some row sees its first key
        visits = (first_keys[None, None, :] <= rows[:, :, None] + (s_len - t_len)).any(1).sum(-1)
    else:
        visits = torch.full((row_blocks,), len(first_keys))
    assert torch.equal(launch["LOCKS"].cpu(), visits.int().expand(4, -1))  # (B H, row blocks)


@pytest.mark.parametrize("kind", ["padding", "causal-padding"])
def test_atomic_dq_matches_the_reference(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """``deterministic=False`` (atomic adds of the dq and rho partials) gives the reference's gradients within the
    fp32 tolerance, across several row and key blocks, and launches without ordering counters."""
    spy = LaunchSpy(kernels._bwd_kernel)
    monkeypatch.setattr(kernels, "_bwd_kernel", spy)
    monkeypatch.setattr(
        kernels, "r_softmax_attention_bwd", functools.partial(kernels.r_softmax_attention_bwd, deterministic=False)
    )
    run_case(2, 2, 33, 47, 16, kind, [0.25, 0.75], torch.float32, (16, 16))
    assert spy.launches[-1]["DETERMINISTIC"] is False


# --- the forward's tile classes, live-tile bitmask and tuning candidates (issue 13 item 2) ---


def exact_live_tiles(probs: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """``[B, H, cdiv(T, block_m), cdiv(S, block_n)]``: whether the tile holds a positive reference weight."""
    batch, heads, t_len, s_len = probs.shape
    row_blocks, key_blocks = -(-t_len // block_m), -(-s_len // block_n)
    padded = probs.new_zeros(batch, heads, row_blocks * block_m, key_blocks * block_n)
    padded[..., :t_len, :s_len] = probs
    return (padded.view(batch, heads, row_blocks, block_m, key_blocks, block_n) > 0).any(-1).any(3)


def gapped_padding(batch: int, s_len: int) -> torch.Tensor:
    """Key padding ``[B, S]`` with every tile class at blocks of 16: keys 16..31 all padding (a dead tile between
    valid ones), a few padded keys in 40..47 (mixed), the last 5 padded in batch row 1."""
    key_padding = torch.ones(batch, s_len, dtype=torch.bool)
    key_padding[:, 16:32] = False
    key_padding[0, 40:44] = False
    key_padding[-1, s_len - 5 :] = False
    return key_padding.to(DEVICE)


@settings(max_examples=30, deadline=None)
@given(
    s_len=st.integers(1, 100),
    block=st.sampled_from([16, 32, 64]),
    density=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    broadcast=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_key_tile_classes(s_len: int, block: int, density: float, broadcast: bool, seed: int) -> None:
    """Each ``block`` keys' class is bit 1 if one is valid, plus bit 2 if one is padding or past ``S``; a stride-0
    batch (padding broadcast from one row) gives the same classes as the materialised padding."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(1 if broadcast else 3, s_len, generator=generator) < density
    key_padding = rows.expand(3, s_len) if broadcast else rows
    classes = threshold_module.key_tile_classes(key_padding, block)
    assert classes.dtype == torch.int8 and classes.shape == (3, -(-s_len // block))
    for b in range(3):
        for n in range(classes.shape[1]):
            keys = key_padding[b, n * block : (n + 1) * block].tolist() + [False] * max(0, (n + 1) * block - s_len)
            assert classes[b, n].item() == int(any(keys)) + 2 * int(not all(keys))
    assert torch.equal(classes, threshold_module.key_tile_classes(key_padding.contiguous(), block))


@pytest.mark.parametrize("broadcast", [False, True], ids=["per-row", "broadcast"])
def test_key_tile_classes_make_no_host_read(broadcast: bool) -> None:
    """Classing the key tiles reads no tensor data on the host (a device sync on CUDA) and makes no tensor as
    large as the padding."""
    from device_traffic import DeviceTraffic

    key_padding = gapped_padding(1 if broadcast else 4, 100).expand(4, 100)
    with DeviceTraffic(limit_bytes=key_padding.numel(), inputs=(key_padding,)) as traffic:
        threshold_module.key_tile_classes(key_padding, 32)
    assert traffic.host_reads == [] and traffic.large == []


@pytest.mark.parametrize(
    ("blocks", "causal", "broadcast"),
    [((16, 16), False, False), ((32, 16), True, True), ((16, 32), True, False)],
    ids=["BM16-BN16-full", "BM32-BN16-causal-broadcast", "BM16-BN32-causal"],
)
def test_tile_classes_match_the_reference(blocks: tuple[int, int], causal: bool, broadcast: bool) -> None:
    """Padding with a fully padded key block between valid ones (skipped: "dead" class), a mixed one, full ones and a
    ragged last block; causal tiles below, across and above the diagonal; a stride-0 (broadcast) padding: output and
    gradients match the reference."""
    generator = torch.Generator().manual_seed(8)
    t_len, s_len = 40, 70
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator).to(DEVICE).requires_grad_() for n in (t_len, s_len, s_len))
    key_padding = gapped_padding(2, s_len)
    if broadcast:
        key_padding = key_padding[:1].expand(2, s_len)
    valid = key_padding[:, None, None, :].expand(2, 1, t_len, s_len)
    if causal:
        valid = valid & torch.ones(t_len, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - t_len)
    rate = torch.tensor([0.3, 0.8], device=DEVICE)
    out = RSoftmaxAttentionFunction.apply(q, k, v, key_padding, rate, causal, 0.25, EPS, blocks)
    grad = torch.randn(out.shape, generator=generator).to(DEVICE)
    expected = reference(q, k, v, valid, rate, 0.25)
    assert_matches_reference(out, expected, (q, k, v), (q, k, v), grad, TOLERANCE[torch.float32])


@pytest.mark.parametrize(
    ("blocks", "mask", "kind"),
    [
        ((16, 16), "none", "peaky"),
        ((32, 16), "gapped-padding", "ties"),
        ((16, 32), "causal", "gaussian"),
        ((16, 16), "causal-gapped-padding", "peaky"),
        ((16, 32), "causal-gapped-padding", "ties"),
        ((32, 16), "none", "gaussian"),
    ],
    ids=lambda x: f"BM{x[0]}-BN{x[1]}" if isinstance(x, tuple) else x,
)
def test_live_bitmask_covers_every_live_tile(blocks: tuple[int, int], mask: str, kind: str) -> None:
    """The threshold kernel's live-tile bitmask is conservative: it marks every tile holding a positive reference
    weight (a superset of the exact live set), and never a tile without a valid entry (padding, past the causal
    diagonal). Rates 0 and 1 (the search may end after its first pass) and 0.3 / 0.9."""
    generator = torch.Generator().manual_seed(9)
    t_len, s_len = 40, 70
    if kind == "ties":  # integer scores, many equal to the threshold's order statistics
        q = torch.randint(-2, 3, (2, 4, t_len, 16), generator=generator).float()
        k = torch.randint(-2, 3, (2, 4, s_len, 16), generator=generator).float()
    else:
        q, k = (torch.randn(2, 4, n, 16, generator=generator) for n in (t_len, s_len))
        if kind == "peaky":  # key 5 far above the rest for most rows: few live tiles
            q = q * 3.0
            k[:, :, 5] = q.mean(2) * 2.0
    q, k = q.to(DEVICE), k.to(DEVICE)
    key_padding = gapped_padding(2, s_len) if "padding" in mask else None
    valid = torch.ones(2, 1, t_len, s_len, dtype=torch.bool, device=DEVICE)
    if key_padding is not None:
        valid = valid & key_padding[:, None, None, :]
    if "causal" in mask:
        valid = valid & torch.ones(t_len, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - t_len)
    rate = torch.tensor([0.0, 0.3, 0.9, 1.0], device=DEVICE)
    found = r_softmax_threshold(q, k, key_padding, rate, "causal" in mask, 0.25, EPS, *blocks)
    probs = r_softmax(q @ k.transpose(-1, -2) * 0.25, rate.view(1, -1, 1, 1), mask=valid, eps=EPS)

    assert (found.block_m, found.block_n) == blocks
    assert found.live.dtype == torch.uint8 and set(found.live.unique().tolist()) <= {0, 1}
    live = found.live.bool()
    assert live.shape == exact_live_tiles(probs, *blocks).shape
    assert (live | ~exact_live_tiles(probs, *blocks)).all(), "a tile with a positive weight is marked dead"
    has_valid = exact_live_tiles(valid.expand_as(probs).float(), *blocks)
    assert not (live & ~has_valid).any(), "a tile without a valid entry is marked live"


def test_output_kernel_skips_tiles_marked_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output kernel reads the bitmask and nothing else to skip a tile: with some live tiles marked dead, its
    output is the weights ``relu(u) exp(x - m)`` of the other tiles (same ``m``, ``t``) over their sum, times ``v``."""
    generator = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator).to(DEVICE) for n in (32, 64, 64))
    rate = torch.tensor([0.2, 0.6], device=DEVICE)
    found = r_softmax_threshold(q, k, None, rate, False, 0.25, EPS, 16, 16)
    keep = torch.ones_like(found.live)
    keep[0, 0, 0, 2] = keep[0, 1, 1, 0] = keep[0, 1, 1, 3] = 0  # (row block, key block) per head
    assert (found.live.bool() & ~keep.bool()).any()
    dropped = dataclasses.replace(found, live=found.live * keep)
    monkeypatch.setattr(kernels, "r_softmax_threshold", lambda *args, **kwargs: dropped)
    out, _, _ = r_softmax_attention_fwd(q, k, v, None, rate, False, 0.25, EPS, 16, 16)

    scores = q @ k.transpose(-1, -2) * 0.25  # (1, 2, T, S)
    shift = scores - found.row_max[..., None]
    weights = torch.relu(shift + found.margin[..., None]) * shift.exp()
    weights = weights * keep.bool().repeat_interleave(16, 2).repeat_interleave(16, 3)
    expected = (weights / weights.sum(-1, keepdim=True) @ v).transpose(1, 2)  # (B, T, H, D)
    assert_close(out, expected, TOLERANCE[torch.float32], "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_pruning_keeps_fitting_candidates_for_both_kernels(head_dim: int, dtype: torch.dtype) -> None:
    """For every supported head dim and dtype the threshold kernel keeps candidates, each within an H100 block's
    shared memory by the estimate, and each fits the output kernel too (which runs with the same configuration)."""
    named_args = {"Q": torch.empty(0, dtype=dtype)}
    kept = tuning.prune_threshold_configs(tuning.threshold_configs(), named_args, HEAD_DIM=head_dim)
    assert kept
    for config in kept:
        blocks = {name: config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N")}
        estimate = tuning.shared_memory_estimate(
            "threshold", *blocks.values(), head_dim, dtype.itemsize, config.num_stages
        )
        assert estimate <= tuning.SHARED_MEMORY_LIMIT
        assert tuning.fits("output", *blocks.values(), head_dim, dtype, config.num_warps, config.num_stages)


class ForcedConfig:
    """Stands in for ``triton.autotune``'s Autotuner on the interpreter (which cannot time kernels): launches the
    kernel with one given configuration and reports it as ``best_config``, as the Autotuner does after tuning."""

    def __init__(self, kernel: object, config: object) -> None:
        self.kernel, self.best_config = kernel, config

    def __getitem__(self, grid: object):
        def launch(*args: object, **kwargs: object) -> None:
            self.kernel[grid](*args, **kwargs, **self.best_config.kwargs)

        return launch


#: one threshold-kernel candidate per distinct tile the pruning keeps for D = 16 in fp32 (the interpreter ignores
#: warps and stages)
TUNED_CONFIGS = {
    (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]): config
    for config in tuning.prune_threshold_configs(tuning.threshold_configs(), {"Q": torch.empty(0)}, HEAD_DIM=16)
}


@pytest.mark.parametrize("blocks", sorted(TUNED_CONFIGS), ids=lambda b: f"BM{b[0]}-BN{b[1]}")
@pytest.mark.parametrize(("s_len", "causal"), [(150, True), (160, False)], ids=["S150-causal", "S160"])
def test_every_tuning_candidate_matches_the_reference(
    monkeypatch: pytest.MonkeyPatch, blocks: tuple, s_len: int, causal: bool
) -> None:
    """The autotuned path with each candidate tile it may choose: buffers allocated for the smallest tile and viewed
    for the chosen one, key-padding classes computed per 32 keys and combined per tile, the output kernel launched
    with the threshold kernel's tile. Output, thresholds and bitmask agree with the reference."""
    forced = ForcedConfig(threshold_module._threshold_kernel, TUNED_CONFIGS[blocks])
    monkeypatch.setattr(tuning, "autotuned", lambda q, block_m, block_n: block_m is None and block_n is None)
    monkeypatch.setattr(threshold_module, "_threshold_kernel_tuned", forced)
    generator = torch.Generator().manual_seed(11)
    t_len = 140  # S = 150: ragged key blocks at every candidate tile; S = 160 (not causal, so no position test
    # masks them): whole 32-key class blocks but a ragged tile wherever BLOCK_N > 32, whose class blocks past S
    # must count as invalid keys, not as no keys
    q, k, v = (torch.randn(2, 2, n, 16, generator=generator).to(DEVICE) for n in (t_len, s_len, s_len))
    key_padding = torch.ones(2, s_len, dtype=torch.bool, device=DEVICE)
    key_padding[0, 32:64] = False  # a dead 32-key block: dead tile or part of a mixed one, depending on BLOCK_N
    key_padding[1, 100:] = False
    visible = torch.ones(t_len, s_len, dtype=torch.bool, device=DEVICE).tril(s_len - t_len if causal else s_len)
    valid = key_padding[:, None, None, :] & visible
    rate = torch.tensor([0.3, 0.8], device=DEVICE)
    out, (row_max, margin, _, _, live), tile = r_softmax_attention_fwd(q, k, v, key_padding, rate, causal, 0.25, EPS)

    scores = q @ k.transpose(-1, -2) * 0.25
    probs = r_softmax(scores, rate.view(1, -1, 1, 1), mask=valid, eps=EPS)
    assert tile == blocks
    assert_close(out, (probs @ v).transpose(1, 2), TOLERANCE[torch.float32], "output")
    expected_margin = r_softmax_margin(scores, rate.view(1, -1, 1, 1), mask=valid.expand_as(scores), eps=EPS)
    assert_close(margin, expected_margin.squeeze(-1), TOLERANCE[torch.float32], "margin")
    assert live.shape == (2, 2, -(-t_len // blocks[0]), -(-s_len // blocks[1]))
    assert (live.bool() | ~exact_live_tiles(probs, *blocks)).all()


def test_backward_skips_the_tiles_the_forward_bitmask_marks_dead() -> None:
    """The backward reads the forward's live-tile bitmask where each of its tiles lies inside one forward tile: a
    bitmask marking every tile dead leaves every gradient zero; backward tiles larger than the forward's ignore it
    and give the gradients of the true bitmask."""
    q, k, v, grad = (x.detach() for x in backward_inputs(33, 47))
    rate = torch.tensor([0.25, 0.75], device=DEVICE)
    out, stats, blocks = r_softmax_attention_fwd(q, k, v, None, rate, False, 0.25, EPS, 16, 16)
    assert blocks == (16, 16)
    grads = r_softmax_attention_bwd(grad, q, k, v, out, None, stats, False, 0.25, 16, 16, live_blocks=blocks)
    dead = (*stats[:4], torch.zeros_like(stats[4]))
    skipped = r_softmax_attention_bwd(grad, q, k, v, out, None, dead, False, 0.25, 16, 16, live_blocks=blocks)
    assert all((gradient == 0).all() for gradient in skipped)
    ignored = r_softmax_attention_bwd(grad, q, k, v, out, None, dead, False, 0.25, 32, 32, live_blocks=blocks)
    for name, actual, wanted in zip(("dq", "dk", "dv"), ignored, grads, strict=True):
        assert_close(actual, wanted, TOLERANCE[torch.float32], name)
