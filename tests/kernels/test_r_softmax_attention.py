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

import os
import sys

import pytest
import torch

# TRITON_INTERPRET is read whenever a function is decorated with @triton.jit, Triton's own standard library
# (tl.max, tl.sum, ...) included, at `import triton`. Anything may import Triton early (torch._dynamo does, through
# transformers and peft), so this module sorts first in the default run; otherwise set TRITON_INTERPRET=1 outside.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.max, InterpretedFunction):
        pytest.skip(
            "no CUDA, and Triton was imported before TRITON_INTERPRET=1 could be set: run with TRITON_INTERPRET=1",
            allow_module_level=True,
        )

from hf_sparse_attn.kernels import r_softmax_attention  # noqa: E402
from hf_sparse_attn.kernels.r_softmax_attention_triton import (  # noqa: E402
    RSoftmaxAttentionFunction,
    r_softmax_attention_fwd,
)
from hf_sparse_attn.ops.r_softmax import r_softmax, r_softmax_margin  # noqa: E402

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
    grads = torch.autograd.grad(out, (q, k, v), grad)

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    expected = reference(q32, k32, v32, valid, rate, scale)
    expected_grads = torch.autograd.grad(expected, (q32, k32, v32), grad.float())
    assert out.dtype == dtype and out.shape == (batch, t_len, heads, head_dim)
    tol = TOLERANCE[dtype]
    assert_close(out, expected, tol, "output")
    for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected_grads, strict=True):
        assert actual.dtype == dtype
        assert_close(actual, wanted, tol, name)


CASES = [
    # B, H, T, S, D, mask, rates, dtype
    (1, 2, 16, 16, 16, "none", [0.5], torch.float32),
    (2, 2, 33, 33, 32, "padding", [0.25, 0.9], torch.float32),
    (1, 2, 64, 64, 16, "causal", [0.5], torch.float32),
    (1, 2, 16, 33, 16, "causal", [0.25, 0.9], torch.float32),
    (2, 1, 33, 64, 32, "causal-padding", [0.9], torch.float32),
    (1, 2, 33, 33, 16, "none", [0.0, 1.0], torch.float32),
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
    _, (row_max, margin, _, argmax) = r_softmax_attention_fwd(q, k, k, key_padding, rate, mask != "none", 1.0, EPS)

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
    """``backend='triton'`` runs this kernel (on CPU through the interpreter) on a transformers-style bool mask and
    on q, k, v laid out as transformers makes them: ``[B, T, H, D]`` projections viewed as ``[B, H, T, D]``."""
    generator = torch.Generator().manual_seed(2)
    leaves = [torch.randn(2, n, 2, 16, generator=generator).to(DEVICE).requires_grad_() for n in (20, 36, 36)]
    q, k, v = (leaf.transpose(1, 2) for leaf in leaves)  # (B, H, T or S, D), not contiguous
    _, valid = make_masks(2, 20, 36, "causal-padding")
    rate = torch.tensor([0.3, 0.7], device=DEVICE)
    out, weights = r_softmax_attention(q, k, v, valid, rate, backend="triton")
    expected, _ = r_softmax_attention(q, k, v, valid, rate, backend="reference")
    assert weights is None
    assert out.grad_fn is not None and "RSoftmaxAttentionFunction" in type(out.grad_fn).__name__
    assert_close(out, expected, 1e-4, "output")
    grads = torch.autograd.grad(out.sum(), leaves)  # a stride-0 upstream gradient
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected_grads, strict=True):
        assert_close(actual, wanted, 1e-4, name)
