"""The Triton row kernel of the fused head loss against its reference twin, and the dispatcher.

The reference (:func:`hf_sparse_attn.ops.head_loss.row_loss_and_grad`) is the specification. Without CUDA the kernel
runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before Triton is imported), so shapes stay tiny; a
block size smaller than the vocabulary makes every row take several blocks in both passes.
"""

from __future__ import annotations

import pytest
import torch
import triton_interpreter  # noqa: F401  (before Triton loads: its CPU interpreter without CUDA; skip without Triton)

from hf_sparse_attn.kernels import fused_head_loss, head_loss_triton
from hf_sparse_attn.kernels.head_loss_dispatch import row_kernel
from hf_sparse_attn.ops.head_loss import row_loss_and_grad

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(head_loss_triton, "BLOCK_V", 16)


@pytest.mark.parametrize("sigsoftmax", [False, True], ids=["softmax", "sigsoftmax"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2], ids=["eps0", "eps0.2"])
@pytest.mark.parametrize("vocab", [7, 16, 53], ids=lambda v: f"V{v}")
def test_row_kernel_matches_reference(small_blocks, vocab, smoothing, sigsoftmax):
    gen = torch.Generator().manual_seed(vocab)
    scores = (torch.randn(6, vocab, generator=gen) * 5).to(DEVICE)  # |z| up to ~20: softplus's both branches
    labels = torch.randint(0, vocab, (6,), generator=gen).to(DEVICE)
    weights = torch.rand(6, generator=gen).to(DEVICE)
    weights[2] = 0.0  # an ignored row
    expected_grad = scores.clone()
    expected = row_loss_and_grad(expected_grad, labels, weights, smoothing, sigsoftmax)
    got_grad = scores.clone()
    got = head_loss_triton.triton_row_loss_and_grad(got_grad, labels, weights, smoothing, sigsoftmax)
    # float32 sums over V terms, computed in different orders: a few ulps of the row's log-sum-exp
    tol = 8 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())
    torch.testing.assert_close(got_grad, expected_grad, rtol=tol, atol=tol)
    assert got[2] == 0 and got_grad[2].abs().max() == 0


@pytest.mark.parametrize("head", ["softmax", "sigsoftmax", "plif"])
def test_fused_loss_with_the_kernel_matches_the_reference(small_blocks, head):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 8, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(37, 8, generator=gen).to(DEVICE).requires_grad_()
    labels = torch.randint(0, 37, (10,), generator=gen).to(DEVICE)
    labels[3] = -100
    options = {"head": head, "chunk_size": 4, "label_smoothing": 0.1}
    if head == "plif":
        options |= {"theta": torch.randn(9, generator=gen).to(DEVICE).requires_grad_(), "knot_range": 4.0}
    leaves = [hidden, weight, *([options["theta"]] if head == "plif" else [])]
    results = {}
    for backend in ("reference", "triton"):
        loss = fused_head_loss(hidden, weight, labels, backend=backend, **options)
        results[backend] = (loss, *torch.autograd.grad(loss, leaves))
    tol = 16 * torch.finfo(torch.float32).eps
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


def test_dispatcher():
    assert row_kernel(torch.device("cpu"), "reference") == (row_loss_and_grad, "the reference backend was requested")
    if not torch.cuda.is_available():
        rows, reason = row_kernel(torch.device("cpu"))  # auto never runs the interpreter
        assert rows is row_loss_and_grad and "needs CUDA" in reason
        assert row_kernel(torch.device("cpu"), "triton")[0] is head_loss_triton.triton_row_loss_and_grad
    with pytest.raises(ValueError, match="backend must be one of"):
        row_kernel(torch.device("cpu"), "cuda")
    with pytest.raises(TypeError, match="pass backend="):
        fused_head_loss(torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1]), rows=row_loss_and_grad)


def test_kernel_refuses_what_it_does_not_cover():
    scores = torch.randn(2, 5, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float32 scores"):
        head_loss_triton.triton_row_loss_and_grad(scores, torch.tensor([0, 1]), torch.ones(2), 0.0, False)
