"""The r-softmax attention dispatcher: reference path, kernel eligibility, validation, and no hard Triton dependency.

Runs without Triton; the kernel path itself is tested in ``test_r_softmax_attention.py``.
"""

from __future__ import annotations

import doctest
import importlib
import sys

import pytest
import torch

import hf_sparse_attn
import hf_sparse_attn.kernels.dispatch as dispatch
from hf_sparse_attn.kernels import kernel_unsupported_reason, r_softmax_attention
from hf_sparse_attn.ops.r_softmax import r_softmax


def qkv(batch: int = 2, heads: int = 3, t_len: int = 5, s_len: int = 7, head_dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=generator) for n in (t_len, s_len, s_len))


def padding_causal_mask(batch: int, t_len: int, s_len: int) -> torch.Tensor:
    """``[B, 1, T, S]`` bool: batch row b loses its last b keys; queries aligned to the end of the keys."""
    keys = torch.ones(batch, s_len, dtype=torch.bool)
    for row in range(batch):
        keys[row, s_len - row :] = False
    return keys[:, None, None, :] & torch.ones(t_len, s_len, dtype=torch.bool).tril(s_len - t_len)


@pytest.mark.parametrize("rate", [0.5, "per-head"])
def test_reference_path_is_r_softmax_of_the_scores(rate: float | str) -> None:
    """On CPU ``auto`` computes ``r_softmax(scaling q k^T) v`` and returns the probabilities it computed."""
    q, k, v = qkv()
    valid = padding_causal_mask(2, 5, 7)
    rates = torch.tensor([0.2, 0.5, 0.8]) if rate == "per-head" else rate
    out, weights = r_softmax_attention(q, k, v, valid, rates, scaling=0.3)
    broadcast = rates.view(1, -1, 1, 1) if isinstance(rates, torch.Tensor) else rates
    probs = r_softmax(q @ k.transpose(-1, -2) * 0.3, broadcast, mask=valid)
    torch.testing.assert_close(weights, probs)
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2))
    assert out.shape == (2, 5, 3, 16)


def test_default_scaling_and_dropout() -> None:
    q, k, v = qkv()
    out, _ = r_softmax_attention(q, k, v, None, 0.5)
    probs = r_softmax(q @ k.transpose(-1, -2) / 4.0, 0.5)
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2))
    torch.manual_seed(0)
    dropped, weights = r_softmax_attention(q, k, v, None, 0.5, dropout=0.5, training=True)
    assert not torch.allclose(dropped, out)
    torch.testing.assert_close(weights, probs)  # weights are returned before dropout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dropout": 0.1, "training": True}, "dropout"),
        ({"need_weights": True}, "weights"),
    ],
    ids=["dropout", "need-weights"],
)
def test_static_reasons_against_the_kernel(kwargs: dict, message: str) -> None:
    q, k, v = (x.to("meta") for x in qkv())
    reason = kernel_unsupported_reason(q, k, v, **kwargs)
    assert reason is not None and message in reason


def test_shape_and_dtype_reasons_against_the_kernel() -> None:
    q, k, v = qkv(head_dim=24)
    assert "head dim" in kernel_unsupported_reason(q, k, v)
    q, k, v = qkv()
    assert "dtypes" in kernel_unsupported_reason(q.double(), k.double(), v.double())
    assert "GQA" in kernel_unsupported_reason(q, k[:, :1], v[:, :1])


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (None, (True, False)),
        ("padding", (True, False)),
        ("padding-causal", (False, True)),
        ("causal-2d", (False, True)),
        ("random", (False, False)),
    ],
)
def test_split_mask_recognises_padding_and_causal_masks(mask: str | None, expected: tuple[bool, bool]) -> None:
    batch, t_len, s_len = 3, 4, 9
    full = padding_causal_mask(batch, t_len, s_len)
    valid = {
        None: None,
        "padding": full[:, :, -1:, :],  # [B, 1, 1, S], broadcast over queries
        "padding-causal": full,
        "causal-2d": torch.ones(t_len, s_len, dtype=torch.bool).tril(s_len - t_len),
        "random": torch.rand(batch, 1, t_len, s_len, generator=torch.Generator().manual_seed(0)) < 0.7,
    }[mask]
    padding, is_padding, is_causal = dispatch._split_mask(valid, batch, t_len, s_len, torch.device("cpu"))
    assert (bool(is_padding), bool(is_causal)) == expected
    if mask in ("padding", "padding-causal"):
        assert torch.equal(padding, full[:, 0, -1, :])


def test_split_mask_rejects_per_head_masks() -> None:
    assert dispatch._split_mask(torch.ones(2, 3, 4, 5, dtype=torch.bool), 2, 4, 5, torch.device("cpu")) == (
        None,
        None,
        None,
    )


def test_triton_backend_refuses_what_it_cannot_run() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        r_softmax_attention(q, k, v, None, 0.5, need_weights=True, backend="triton")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"rate": None}, TypeError, "rate must be a number"),
        ({"rate": True}, TypeError, "rate must be a number"),
        ({"rate": 1.5}, ValueError, r"must lie in \[0, 1\]"),
        ({"eps": 0.0}, ValueError, "eps must be a finite number > 0"),
    ],
    ids=["backend", "rate-none", "rate-bool", "rate-range", "eps"],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        r_softmax_attention(q, k, v, None, **{"rate": 0.5, **kwargs})


def test_three_dimensional_query_is_rejected() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query must be a 4-d tensor"):
        r_softmax_attention(q[0], k, v)


def test_package_imports_and_runs_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``import triton`` failing, the package imports, reports why, and computes with the reference."""
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setattr(hf_sparse_attn, "kernels", hf_sparse_attn.kernels)  # restored with sys.modules below
    for name in [name for name in sys.modules if name.startswith("hf_sparse_attn.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    kernels = importlib.import_module("hf_sparse_attn.kernels")
    assert not kernels.triton_available()
    q, k, v = qkv()
    assert "triton is not installed" in kernels.kernel_unsupported_reason(q, k, v)
    out, _ = kernels.r_softmax_attention(q, k, v, None, 0.5)
    torch.testing.assert_close(out, (r_softmax(q @ k.transpose(-1, -2) / 4.0, 0.5) @ v).transpose(1, 2))


def test_docstring_examples() -> None:
    result = doctest.testmod(dispatch, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_bias_is_added_to_the_scaled_scores() -> None:
    """``bias`` is an additive mask/bias, as eager attention adds it; masked keys ignore whatever it holds there."""
    q, k, v = qkv()
    valid = padding_causal_mask(2, 5, 7)
    bias = -torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(1)) * 3
    bias = bias.masked_fill(~valid, float("nan"))  # ignored: those keys are masked
    out, weights = r_softmax_attention(q, k, v, valid, 0.5, scaling=0.3, bias=bias)
    scores = (q.double() @ k.double().transpose(-1, -2)) * 0.3 + bias.double().masked_fill(~valid, 0.0)
    probs = r_softmax(scores, 0.5, mask=valid)
    torch.testing.assert_close(weights, probs.float())  # fp32 computation: fp32 default tolerances
    torch.testing.assert_close(out, (probs @ v.double()).transpose(1, 2).float())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"valid": torch.ones(5, 7)}, TypeError, "valid must be None or a bool tensor; got dtype torch.float32"),
        ({"valid": torch.ones(4, 7, dtype=torch.bool)}, ValueError, r"valid of shape \(4, 7\) does not broadcast"),
        ({"bias": torch.zeros(5, 7, dtype=torch.long)}, TypeError, "bias must be None or a floating-point tensor"),
        ({"bias": torch.zeros(5, 7, dtype=torch.bool)}, TypeError, "bias must be None or a floating-point tensor"),
        ({"bias": torch.zeros(3, 1, 5, 7)}, ValueError, r"bias of shape \(3, 1, 5, 7\) does not broadcast"),
    ],
    ids=["valid-float", "valid-shape", "bias-int", "bias-bool", "bias-shape"],
)
def test_bad_masks_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        r_softmax_attention(q, k, v, rate=0.5, **kwargs)


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(
    ("bias_at_valid", "kernel"), [(0.0, True), (-1.0, False), (float("nan"), False)], ids=["zero", "bias", "nan"]
)
def test_kernel_takes_an_additive_mask_only_without_biases(
    monkeypatch: pytest.MonkeyPatch, bias_at_valid: float, kernel: bool
) -> None:
    """An additive mask that is 0 at every valid key is a plain mask (kernel); a bias or a NaN needs the reference,
    which neither drops the bias nor hides the NaN."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the static checks accept CPU tensors
    q, k, v = qkv()
    valid = padding_causal_mask(2, 5, 7)
    bias = torch.full(valid.shape, bias_at_valid).masked_fill(~valid, torch.finfo(torch.float32).min)
    plan, reason = dispatch._kernel_plan(q, k, v, valid, 0.5, 0.0, False, False, "triton", bias)
    assert (plan is not None) == kernel
    assert kernel or "biases" in reason
