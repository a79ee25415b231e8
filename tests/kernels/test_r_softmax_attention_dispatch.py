"""The r-softmax attention dispatcher: reference path, kernel eligibility, validation, and no hard Triton dependency;
the mask structure (key padding + causal offset) it takes instead of materialised masks, the structure transformers'
masks carry from our mask builder, and a kernel-path decision without host syncs or ``[B, T, S]`` temporaries.

Runs without Triton (tests of the kernel plan skip); the kernel itself is tested in ``test_r_softmax_attention.py``.
"""

from __future__ import annotations

import doctest
import importlib
import sys
from collections.abc import Callable

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model
from device_traffic import DeviceTraffic
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

import hf_sparse_attn
import hf_sparse_attn.kernels.dispatch as dispatch
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.attention import (
    ATTENTION_ALIAS,
    LAYOUT_ATTR,
    RATE_ATTR,
    mask_structure,
    returning_weights,
    sparse_attention_mask,
)
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


def test_static_reasons_against_the_kernel() -> None:
    q, k, v = (x.to("meta") for x in qkv())
    reason = kernel_unsupported_reason(q, k, v, need_weights=True)
    assert reason is not None and "weights" in reason


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


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize(
    ("padding", "offset", "rate"),
    [(True, None, 0.5), (True, 32, 0.5), (False, 32, "per-head"), (True, 0, "per-head"), (True, 63, 0.5)],
    ids=["padding", "padding-causal", "causal-per-head", "top-left-sliced", "offset-sees-all"],
)
def test_kernel_plan_makes_no_sync_and_no_scores_sized_temporary(
    monkeypatch: pytest.MonkeyPatch, padding: bool, offset: int | None, rate: float | str
) -> None:
    """The kernel-path decision reads no tensor data on the host and allocates nothing of ``B T S`` bytes (the
    smallest ``[B, T, S]`` temporary, a bool one). A per-head rate tensor is checked on its first call only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the static checks accept CPU tensors
    batch, t_len, s_len = 2, 32, 64
    q, k, v = qkv(batch=batch, heads=3, t_len=t_len, s_len=s_len)
    key_padding = padding_causal_mask(batch, 1, s_len)[:, 0, 0, :].clone() if padding else None  # (B, S)
    rates = torch.tensor([0.2, 0.5, 0.8]) if rate == "per-head" else rate
    arguments = (q, k, v, None, None, key_padding, offset, rates, False, "triton")
    dispatch._kernel_plan(*arguments)  # the first call may check a rate tensor's range
    with DeviceTraffic(batch * t_len * s_len, (q, k, v)) as traffic:
        plan, reason = dispatch._kernel_plan(*arguments)
    assert plan is not None, reason
    assert traffic.host_reads == [] and traffic.large == []


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_kernel_rates_follow_in_place_changes_of_a_rate_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-tensor cache of checked rates is keyed on the tensor's in-place version: a changed rate is used, and
    re-checked."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv()
    rates = torch.tensor([0.2, 0.5, 0.8])

    def planned_rates() -> list[float]:
        plan, reason = dispatch._kernel_plan(q, k, v, None, None, None, None, rates, False, "triton")
        return plan[3].tolist()

    assert planned_rates() == pytest.approx([0.2, 0.5, 0.8])
    rates[0] = 1.5
    with pytest.raises(ValueError, match=r"rate must lie in \[0, 1\]"):
        planned_rates()
    rates[0] = 0.3
    assert planned_rates() == pytest.approx([0.3, 0.5, 0.8])


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
            0.5, False, "triton",
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


# The structure transformers hands over: masks from our builder carry (key padding, causal offset)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_length=st.integers(1, 6),
    kv_length=st.integers(1, 9),
    kv_offset=st.integers(0, 3),
    q_offset=st.integers(0, 12),
    causal=st.booleans(),
    padded=st.booleans(),
    tensor_offset=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mask_builder_records_exactly_the_mask_it_builds(
    batch, q_length, kv_length, kv_offset, q_offset, causal, padded, tensor_offset, seed
) -> None:
    """For any lengths, offsets (a static cache passes the query offset as a tensor) and 2-D padding (possibly
    shorter than the keys, as transformers allows), the recorded structure describes the built mask entry for
    entry, and recording it reads no tensor data. Only a tensor offset with several causal queries (which would
    need a sync) records nothing."""
    generator = torch.Generator().manual_seed(seed)
    width = kv_offset + kv_length - (seed % 2)  # sometimes one short: sdpa_mask pads it
    padding = torch.rand(batch, width, generator=generator) < 0.7 if padded else None
    arguments = {
        "batch_size": batch, "q_length": q_length, "kv_length": kv_length, "kv_offset": kv_offset,
        "q_offset": torch.tensor(q_offset) if tensor_offset else q_offset, "attention_mask": padding,
        "mask_function": causal_mask_function if causal else bidirectional_mask_function,
        "allow_is_causal_skip": False,
    }  # fmt: skip
    with DeviceTraffic(1 << 62, ()) as traffic:
        mask = sparse_attention_mask(**arguments)
    assert traffic.host_reads == []
    expected = sdpa_mask(**arguments)
    assert torch.equal(mask, expected)
    layout = getattr(mask, LAYOUT_ATTR, None)
    if causal and tensor_offset and q_length > 1:
        assert layout is None
        return
    key_padding, offset = layout
    described = dispatch.structured_mask(key_padding, offset, q_length, kv_length, torch.device("cpu"))
    described = torch.ones_like(mask) if described is None else described.expand_as(mask)
    assert torch.equal(described, mask)


def attention_masks_seen(model: torch.nn.Module) -> tuple[list, Callable[[], object]]:
    """``(seen, remove)``: every call of a self-attention module appends ``(module, attention_mask, T)``."""
    seen = []

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen.append((module, kwargs.get("attention_mask"), hidden.shape[1]))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in self_attention_modules(model)]
    return seen, lambda: [handle.remove() for handle in handles]


@pytest.mark.parametrize(
    "case", ["bert-padded", "gpt2-padded", "gpt2-generate", "gpt2-generate-static"], ids=lambda case: case
)
def test_patched_models_hand_r_softmax_layers_a_known_structure(case: str) -> None:
    """In real models every r-softmax layer call gets a mask whose structure is known without reading it (prefill,
    decoding with a dynamic cache, a static cache's prefill and decoding), and that structure is the mask."""
    model_class = transformers.BertModel if case.startswith("bert") else transformers.GPT2LMHeadModel
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5)
    batch = padded_batch(batch_size=2, length=6)
    if case.startswith("gpt2-generate"):  # generation pads on the left
        batch["attention_mask"] = batch["attention_mask"].flip(-1)
    seen, remove = attention_masks_seen(model)
    try:
        with torch.no_grad():
            if case.startswith("gpt2-generate"):
                cache = {"cache_implementation": "static"} if case.endswith("static") else {}
                model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=2, **cache)
            else:
                model(**batch)
    finally:
        remove()
    assert {t_len for _, _, t_len in seen} == ({6, 1} if "generate" in case else {6})
    for module, mask, t_len in seen:
        s_len = t_len if mask is None else mask.shape[-1]
        structure = mask_structure(mask, module, 2, t_len, s_len)
        assert structure is not None
        if mask is not None:
            described = dispatch.structured_mask(*structure, t_len, s_len, torch.device("cpu"))
            assert torch.equal(described.expand_as(mask), mask)


def test_a_users_4d_mask_takes_the_general_path() -> None:
    """A mask transformers did not build (here the user's own 4-D mask) has no recorded structure."""
    module = torch.nn.Module()
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    assert mask_structure(mask, module, 2, 4, 4) is None
    assert mask_structure(None, module, 2, 4, 4) == (None, 0)  # modules are causal unless they say otherwise
    module.is_causal = False
    assert mask_structure(None, module, 2, 4, 4) == (None, None)


def test_returning_weights_covers_models_loaded_by_the_registered_name(tmp_path) -> None:
    """A model loaded with ``attn_implementation="r_softmax"`` alone has no rate attributes on its modules; its
    layers (here the softmax layer 0, which returns no weights otherwise) still return weights in the block."""
    hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=[None, 0.5]).save_pretrained(tmp_path)
    model = transformers.BertModel.from_pretrained(tmp_path, attn_implementation=ATTENTION_ALIAS).eval()
    layer = self_attention_modules(model)[0]
    assert not hasattr(layer, RATE_ATTR)
    weights = []
    handle = layer.register_forward_hook(lambda module, args, output: weights.append(output[1]))
    try:
        with torch.no_grad():
            model(**padded_batch())
            with returning_weights(model):
                model(**padded_batch())
    finally:
        handle.remove()
    assert weights[0] is None
    assert weights[1].shape == (3, 4, 12, 12)
    torch.testing.assert_close(weights[1].sum(-1), torch.ones(3, 4, 12))


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton is not installed")
def test_training_with_dropout_takes_the_kernel_with_a_seed_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention dropout in training no longer sends the call to the reference: the kernel draws the mask, keyed by
    a seed taken from torch's CPU generator, so ``torch.manual_seed`` makes it reproducible; the output equals the
    reference with the kernel's own mask (:func:`dropout_keep_mask` of that seed)."""
    from hf_sparse_attn.kernels.r_softmax_attention_triton import dropout_keep_mask

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = qkv(t_len=6, s_len=9)
    key_padding = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])  # (B, S)
    p_drop, scaling = 0.4, 0.25

    def run() -> torch.Tensor:
        torch.manual_seed(11)
        out, weights = r_softmax_attention(
            q, k, v, None, 0.5, scaling, dropout=p_drop, training=True, key_padding=key_padding, backend="triton"
        )
        assert weights is None  # the kernel path ran
        return out

    out = run()
    assert torch.equal(run(), out)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, ()).item())  # what the dispatcher draws
    keep = dropout_keep_mask(seed, p_drop, 2, 3, 6, 9, "cpu")  # (B, H, T, S)
    probs = r_softmax(q @ k.transpose(-1, -2) * scaling, 0.5, mask=key_padding[:, None, None, :])
    expected = ((probs * keep / (1 - p_drop)) @ v).transpose(1, 2)  # (B, T, H, D)
    torch.testing.assert_close(out, expected)  # fp32 defaults
