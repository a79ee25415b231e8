"""The r-softmax attention dispatcher: reference path, kernel eligibility, validation, and no hard Triton dependency.

Runs without Triton; the kernel path itself is tested in ``test_r_softmax_attention.py``.
"""

from __future__ import annotations

import doctest
import importlib
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

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


def explicit_mask(key_padding: torch.Tensor | None, offset: int | None, t_len: int, s_len: int) -> torch.Tensor:
    """``[B, 1, T, S]`` bool, entry by entry: key ``j`` valid in batch row ``b`` and ``j <= i + offset``."""
    batch = 1 if key_padding is None else key_padding.shape[0]
    mask = torch.zeros(batch, 1, t_len, s_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(t_len):
            for j in range(s_len):
                padded = key_padding is not None and not key_padding[b, j]
                mask[b, 0, i, j] = not padded and (offset is None or j <= i + offset)
    return mask


@pytest.mark.parametrize("offset", [None, 0, 2, 4, -1, 8, 20], ids=lambda d: f"offset{d}")
def test_key_padding_and_causal_offset_mean_the_mask_they_describe(offset: int | None) -> None:
    """``key_padding`` + ``causal_offset`` compute what the same mask given as ``valid`` computes (T = 5, S = 9:
    offset 4 = S - T is a KV cache, 0 is SDPA's top-left ``is_causal``, >= S - 1 masks nothing)."""
    q, k, v = qkv(t_len=5, s_len=9)
    key_padding = padding_causal_mask(2, 5, 9)[:, 0, -1, :]  # (B, S): row 1 loses its last key
    out, weights = r_softmax_attention(q, k, v, rate=0.5, key_padding=key_padding, causal_offset=offset)
    expected_out, expected = r_softmax_attention(q, k, v, explicit_mask(key_padding, offset, 5, 9), 0.5)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected_out)


class DeviceTraffic(TorchFunctionMode):
    """Counts, among the torch calls made inside the block, reads of tensor data on the host (each one a device
    sync on CUDA; ``tolist`` does not reach the dispatcher, so a function mode, not a dispatch mode) and new tensors
    whose storage holds at least ``limit_bytes`` (views of the given inputs do not count)."""

    HOST_READS = frozenset(
        {
            torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
            torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
            torch.Tensor.nonzero, torch.nonzero, torch.Tensor.any, torch.Tensor.all, torch.any, torch.all,
        }
    )  # fmt: skip

    def __init__(self, limit_bytes: int, inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.input_storages = {x.untyped_storage().data_ptr() for x in inputs}
        self.host_reads: list[str] = []
        self.large: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            self.host_reads.append(func.__name__)
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() >= self.limit_bytes and storage.data_ptr() not in self.input_storages:
                self.large.append(getattr(func, "__name__", str(func)))
        return out


@pytest.mark.parametrize(
    ("padding", "offset", "rate"),
    [(True, None, 0.5), (True, 32, 0.5), (False, 32, "per-head"), (True, 0, "per-head"), (True, 40, 0.5)],
    ids=["padding", "padding-causal", "causal-per-head", "top-left-sliced", "offset-past-the-end"],
)
def test_kernel_plan_makes_no_sync_and_no_scores_sized_temporary(
    monkeypatch: pytest.MonkeyPatch, padding: bool, offset: int | None, rate: float | str
) -> None:
    """The kernel-path decision reads no tensor data on the host and allocates nothing of ``B T S`` bytes (the
    smallest ``[B, T, S]`` temporary, a bool one). A per-head rate tensor is checked on its first call only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the static checks accept CPU tensors
    batch, t_len, s_len = 2, 32, 64
    q, k, v = qkv(batch=batch, heads=3, t_len=t_len, s_len=s_len)
    key_padding = padding_causal_mask(batch, t_len, s_len)[:, 0, -1, :] if padding else None  # (B, S)
    rates = torch.tensor([0.2, 0.5, 0.8]) if rate == "per-head" else rate
    arguments = (q, k, v, None, None, key_padding, offset, rates, 0.0, False, False, "triton")
    dispatch._kernel_plan(*arguments)  # the first call may check a rate tensor's range
    with DeviceTraffic(batch * t_len * s_len, (q, k, v)) as traffic:
        plan, reason = dispatch._kernel_plan(*arguments)
    assert plan is not None, reason
    assert traffic.host_reads == [] and traffic.large == []


def test_device_traffic_catches_mask_analysis() -> None:
    """The counter of the previous test is not blind: re-analysing a materialised ``[B, 1, T, S]`` mask on the
    host, as the dispatcher used to (comparing it with its last row and reading the verdict), trips both counts."""
    batch, t_len, s_len = 2, 32, 64
    valid = padding_causal_mask(batch, t_len, s_len)
    with DeviceTraffic(batch * t_len * s_len, (valid,)) as traffic:
        padding = valid[:, 0, -1, :]  # (B, S)
        is_padding = (valid[:, 0] == padding[:, None, :]).all()  # a (B, T, S) temporary
        torch.stack([is_padding]).tolist()  # the host read
    assert traffic.host_reads == ["all", "tolist"] and traffic.large == ["__eq__"]


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_kernel_plan_from_structure(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the plan hands the kernel: causality aligned to the end of the keys, keys that no query sees cut off
    (a view), a stride-0 key padding for one padding row; a general mask or a bias goes to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(t_len=5, s_len=9)
    one_row = torch.ones(1, 9, dtype=torch.bool)

    def plan(**kwargs):
        arguments = {"valid": None, "bias": None, "key_padding": None, "causal_offset": None, **kwargs}
        return dispatch._kernel_plan(
            q, k, v, arguments["valid"], arguments["bias"], arguments["key_padding"], arguments["causal_offset"],
            0.5, 0.0, False, False, "triton",
        )  # fmt: skip

    (key, value, key_padding, rates, causal), _ = plan(causal_offset=4, key_padding=one_row)
    assert causal and key is k and value is v and key_padding.shape == (2, 9) and key_padding.stride(0) == 0
    assert rates.tolist() == [0.5] * 3
    (key, value, _, _, causal), _ = plan(causal_offset=0)  # top-left: keys 5..8 are seen by no query
    assert causal and key.shape[2] == value.shape[2] == 5 and key.data_ptr() == k.data_ptr()
    (key, _, _, _, causal), _ = plan(causal_offset=8)  # every query sees every key
    assert not causal and key is k
    for kwargs, message in [
        ({"valid": torch.ones(5, 9, dtype=torch.bool)}, "general mask"),
        ({"bias": torch.zeros(5, 9)}, "general mask"),
        ({"causal_offset": -5}, "0 < T + d <= S"),
    ]:
        result, reason = plan(**kwargs)
        assert result is None and message in reason


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_kernel_with_a_top_left_causal_offset_matches_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-left causality with more keys than queries (a static cache's prefill): the kernel on the keys no query
    skips gives the reference's output and gradients, and zero gradients to the keys it cut off."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (x.requires_grad_() for x in qkv(t_len=6, s_len=11))
    key_padding = padding_causal_mask(2, 6, 11)[:, 0, -1, :]
    grad = torch.randn(2, 6, 3, 16, generator=torch.Generator().manual_seed(3))
    results = []
    for backend in ("triton", "reference"):
        out, _ = r_softmax_attention(q, k, v, rate=0.5, key_padding=key_padding, causal_offset=0, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)  # fp32 kernel vs fp32 reference
    assert results[0][2][:, :, 6:].abs().max() == 0


@pytest.mark.parametrize("value", ["0", "1", "", None])
def test_kernels_override_values(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(dispatch.KERNELS_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.KERNELS_ENV, value)
    assert dispatch.kernels_override() == (value or None)


def test_kernels_override_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match="HF_SPARSE_ATTN_KERNELS must be unset, '0'"):
        dispatch.kernels_override()


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
        ({"key_padding": torch.ones(2, 7)}, TypeError, "key_padding must be None or a bool tensor"),
        ({"key_padding": torch.ones(2, 1, 7, dtype=torch.bool)}, ValueError, r"key_padding must have shape \[B, S\]"),
        ({"key_padding": torch.ones(3, 7, dtype=torch.bool)}, ValueError, r"= \(2, 7\) \(or \[1, S\]\); got \(3, 7\)"),
        ({"causal_offset": True}, TypeError, "causal_offset must be None"),
        ({"causal_offset": 1.0}, TypeError, "causal_offset must be None"),
    ],
    ids=[
        "valid-float",
        "valid-shape",
        "bias-int",
        "bias-bool",
        "bias-shape",
        "padding-float",
        "padding-3d",
        "padding-batch",
        "offset-bool",
        "offset-float",
    ],
)
def test_bad_masks_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        r_softmax_attention(q, k, v, rate=0.5, **kwargs)
