"""The attention function accepts every mask format transformers may hand it, and matches a dense reference.

Model-level mask tests (every architecture, every mask format, KV cache) are in ``test_masks.py``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_sparse_attn.attention import (
    EPS_ATTR,
    RATE_ATTR,
    additive_mask_cutoff,
    mask_parts,
    returning_weights,
    sparse_attention_forward,
)
from hf_sparse_attn.ops import r_softmax


def attention_module(rate, causal: bool) -> nn.Module:
    module = nn.Module()
    module.is_causal = causal
    setattr(module, RATE_ATTR, rate)
    setattr(module, EPS_ATTR, 1e-8)
    return module.eval()


def qkv(batch=2, heads=3, queries=5, keys=7, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, dim, generator=generator)
    k = torch.randn(batch, heads, keys, dim, generator=generator)
    v = torch.randn(batch, heads, keys, dim, generator=generator)
    return q, k, v


def causal_allowed(queries: int, keys: int) -> torch.Tensor:
    """Query i, aligned to the end of the keys, sees keys j <= i + keys - queries."""
    return torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)


@pytest.mark.parametrize("rate", [0.5, torch.tensor([0.0, 0.5, 1.0])], ids=["r0.5", "per-head"])
@pytest.mark.parametrize("masked_value", [torch.finfo(torch.float32).min, float("-inf")], ids=["finfo-min", "-inf"])
def test_boolean_and_additive_masks_agree(rate, masked_value):
    """A KV-cache style causal mask (queries aligned to the end of the keys), as bool and as additive float."""
    q, k, v = qkv()
    module = attention_module(rate, causal=True)
    allowed = causal_allowed(5, 7)[None, None].expand(2, 1, 5, 7)  # (B, 1, T, S)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, masked_value)
    out_bool, w_bool = sparse_attention_forward(module, q, k, v, allowed, scaling=0.3)
    out_add, w_add = sparse_attention_forward(module, q, k, v, additive, scaling=0.3)
    torch.testing.assert_close(out_add, out_bool, atol=0, rtol=0)
    torch.testing.assert_close(w_add, w_bool, atol=0, rtol=0)
    assert out_bool.shape == (2, 5, 3, 8)  # (B, T, H, D)
    assert torch.all(w_bool[..., ~causal_allowed(5, 7)] == 0)


@pytest.mark.parametrize("keys", [5, 7], ids=["S=T", "static-cache-S>T"])
def test_implicit_causal_mask_is_sdpa_top_left(keys):
    """mask None + is_causal means what SDPA's is_causal means: query i sees keys j <= i (transformers only skips
    the mask where that is right: S == T, or a static-cache prefill whose keys past T are empty slots)."""
    q, k, v = qkv(keys=keys)
    module = attention_module(0.5, causal=True)
    top_left = torch.ones(5, keys, dtype=torch.bool).tril()
    out_none, w_none = sparse_attention_forward(module, q, k, v, None, scaling=0.3)
    out_bool, w_bool = sparse_attention_forward(module, q, k, v, top_left, scaling=0.3)
    torch.testing.assert_close(out_none, out_bool, atol=0, rtol=0)
    torch.testing.assert_close(w_none, w_bool, atol=0, rtol=0)
    # the keyword is_causal overrides the module attribute, as in SDPA
    out_kw, _ = sparse_attention_forward(
        attention_module(0.5, causal=False), q, k, v, None, scaling=0.3, is_causal=True
    )
    torch.testing.assert_close(out_kw, out_bool, atol=0, rtol=0)


def test_matches_dense_reference_with_padding():
    q, k, v = qkv()
    valid = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    valid[1, ..., 4:] = False  # second sequence: 3 padded keys
    out, weights = sparse_attention_forward(attention_module(0.5, causal=False), q, k, v, valid, scaling=0.25)
    expected_weights = r_softmax(q @ k.transpose(-1, -2) * 0.25, 0.5, mask=valid)
    torch.testing.assert_close(weights, expected_weights)
    torch.testing.assert_close(out, (expected_weights @ v).transpose(1, 2))


def test_default_scaling_is_inverse_sqrt_head_dim():
    q, k, v = qkv()
    module = attention_module(0.5, causal=False)
    torch.testing.assert_close(
        sparse_attention_forward(module, q, k, v, None)[0],
        sparse_attention_forward(module, q, k, v, None, scaling=8**-0.5)[0],
    )


@pytest.mark.parametrize("rate", [None, 0.5], ids=["softmax", "r0.5"])
def test_fully_masked_query_rows_give_zeros_not_nan(rate):
    q, k, v = qkv()
    valid = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    valid[0, :, 2] = False  # query 2 of sequence 0 may attend nothing
    module = attention_module(rate, causal=False)
    out, weights = sparse_attention_forward(module, q, k, v, valid, output_attentions=True)
    assert torch.isfinite(out).all()
    assert torch.all(weights[0, :, 2] == 0) and torch.all(out[0, 2] == 0)


def dense_reference(q, k, v, rate, scaling, valid=None, bias=None):
    """float64 attention written out here, independently of the attention function: scores, additive bias, then
    softmax (rate None) or the r-softmax specification, then the weighted sum of values."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) * scaling  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias.double()
    if rate is None:
        probs = torch.softmax(scores if valid is None else scores.masked_fill(~valid, float("-inf")), dim=-1)
    else:
        probs = r_softmax(scores, rate, mask=valid)
    return (probs @ v).transpose(1, 2), probs  # (B, T, H, D)


@pytest.mark.parametrize("mask", ["none", "bool", "float-finfo-min", "float-bias"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_softmax_layers_run_transformers_sdpa(monkeypatch, mask, causal):
    """A layer with rate None hands its arguments to transformers' SDPA function: bit-identical outputs."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import hf_sparse_attn.attention as attention

    calls = []

    def spy(*args, **kwargs):
        calls.append(args[4])
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    q, k, v = qkv(keys=5)
    allowed = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.7
    masks = {
        "none": None,
        "bool": allowed,
        "float-finfo-min": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min),
        "float-bias": torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(2)) * 3,
    }
    module = attention_module(None, causal=causal)
    out, weights = sparse_attention_forward(module, q, k, v, masks[mask], scaling=0.3)
    expected, none = sdpa_attention_forward(module, q, k, v, masks[mask], scaling=0.3)
    assert torch.equal(out, expected) and weights is None and none is None
    assert len(calls) == 1 and calls[0] is masks[mask]


def test_softmax_layers_return_probabilities_when_asked():
    """output_attentions (BERT passes it, GPT-2 is recorded through transformers' collector) gives the softmax
    probabilities of a rate-None layer without changing its output."""
    q, k, v = qkv()
    module = attention_module(None, causal=False)
    bias = torch.randn(2, 1, 5, 7, generator=torch.Generator().manual_seed(3))
    bias[1, ..., 5:] = float("-inf")  # padding
    plain, _ = sparse_attention_forward(module, q, k, v, bias, scaling=0.3)
    out, weights = sparse_attention_forward(module, q, k, v, bias, scaling=0.3, output_attentions=True)
    assert torch.equal(out, plain)
    _, expected = dense_reference(q, k, v, None, 0.3, bias=bias)
    torch.testing.assert_close(weights.double(), expected)


@pytest.mark.parametrize("bias_scale", [1.0, 1e4, 1e9], ids=["bias", "-1e4", "-1e9"])
def test_finite_additive_masks_are_added_to_the_scores(bias_scale):
    """Item 1 of issue 10: finite negative values are added (they shift scores and count towards the rate); values
    at or below finfo.min / 2 and -inf are masked."""
    q, k, v = qkv(keys=9)
    generator = torch.Generator().manual_seed(4)
    bias = -torch.rand(2, 1, 5, 9, generator=generator) * bias_scale  # (B, 1, T, S), values in (-scale, 0]
    bias[0, ..., 7] = torch.finfo(torch.float32).min
    bias[1, ..., 8] = float("-inf")
    valid = bias > torch.finfo(torch.float32).min / 2
    out, weights = sparse_attention_forward(attention_module(0.5, causal=False), q, k, v, bias, scaling=0.3)
    expected_out, expected_weights = dense_reference(q, k, v, 0.5, 0.3, valid=valid, bias=bias)
    torch.testing.assert_close(weights, expected_weights.float())  # fp32 computation: fp32 default tolerances
    torch.testing.assert_close(out, expected_out.float())
    ignored, _ = dense_reference(q, k, v, 0.5, 0.3, valid=valid)  # what main computed: the bias dropped
    assert not torch.allclose(out.double(), ignored, rtol=1e-3, atol=1e-3)


def test_integer_masks_are_refused():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="attention_mask must be a bool mask .* got dtype torch.int64"):
        sparse_attention_forward(attention_module(0.5, causal=False), q, k, v, torch.ones(2, 1, 5, 7, dtype=torch.long))


@pytest.mark.parametrize("rate", [0.5, torch.tensor([0.0, 0.5, 1.0])], ids=["r0.5", "per-head"])
@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_nan_score_makes_its_row_nan_and_only_it(rate, mask):
    """Issue 10 item 11: NaN in a query row's scores gives that row NaN, as softmax does; it is not hidden.

    (Softmax layers are SDPA's: torch's CPU flash kernel, taken without a mask, returns 0 for such a row instead.)"""
    q, k, v = qkv()
    q[0, 1, 3, 0] = float("nan")  # batch 0, head 1, query 3
    allowed = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    allowed[..., 6] = False
    masks = {"none": None, "bool": allowed, "float": torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))}
    out, weights = sparse_attention_forward(
        attention_module(rate, causal=False), q, k, v, masks[mask], output_attentions=True
    )
    nan_rows = torch.zeros(2, 5, 3, dtype=torch.bool)  # (B, T, H)
    nan_rows[0, 3, 1] = True
    assert torch.isnan(out[nan_rows]).all() and torch.isfinite(out[~nan_rows]).all()
    assert torch.isnan(weights[0, 1, 3, :6]).all()


def test_nan_in_an_additive_mask_at_a_valid_key_is_not_hidden():
    q, k, v = qkv()
    bias = torch.zeros(2, 1, 5, 7)
    bias[1, 0, 2, 4] = float("nan")
    out, _ = sparse_attention_forward(attention_module(0.5, causal=False), q, k, v, bias)
    assert torch.isnan(out[1, 2]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, :2]).all()


@pytest.mark.parametrize("rate", [None, 0.5], ids=["softmax", "r0.5"])
def test_fp16_scores_do_not_overflow_where_scaled_scores_fit(rate):
    """Issue 10 item 10: raw q·kᵀ overflows fp16 (> 65504), the scaled scores fit; SDPA stays finite, so must we."""
    signs = torch.randint(0, 2, (1, 2, 6, 64), generator=torch.Generator().manual_seed(5)) * 2 - 1  # (B, H, T, D)
    q = k = (signs * 40.0).half()  # q_i·k_i = 1600 * 64 = 102400 overflows, scaled by 1/8: 12800 fits
    v = torch.randn(1, 2, 6, 64, generator=torch.Generator().manual_seed(6)).half()
    assert torch.isinf(q @ k.transpose(-1, -2)).any()  # the hazard is real
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(sdpa).all()
    out, _ = sparse_attention_forward(attention_module(rate, causal=False), q, k, v, None)
    expected, _ = dense_reference(q, k, v, rate, 64**-0.5)
    eps = torch.finfo(torch.float16).eps  # one rounding of the fp16 output
    torch.testing.assert_close(out.double(), expected, rtol=eps, atol=eps * v.abs().max().item())


def test_bf16_accuracy_by_the_flash_attention_criterion():
    """bf16 error against a float64 reference is at most twice that of a plain bf16 implementation, plus one bf16
    rounding of the output (FlashAttention's test criterion)."""
    q, k, v = (t.to(torch.bfloat16) for t in qkv(heads=4, queries=32, keys=32, dim=64, seed=7))
    q = q * 3  # peaked rows, as in trained models
    causal = torch.ones(32, 32, dtype=torch.bool).tril()
    out, weights = sparse_attention_forward(attention_module(0.5, causal=True), q, k, v, None)
    reference, _ = dense_reference(q, k, v, 0.5, 64**-0.5, valid=causal)
    scores = (q @ k.transpose(-1, -2)) * 64**-0.5  # plain bf16: product, scaling, probabilities and sum in bf16
    plain = (r_softmax(scores, 0.5, mask=causal) @ v).transpose(1, 2)
    error = (out.double() - reference).abs().max().item()
    plain_error = (plain.double() - reference).abs().max().item()
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16
    assert error <= 2 * plain_error + torch.finfo(torch.bfloat16).eps * v.abs().max().item(), (error, plain_error)


def test_returning_weights_nests():
    from conftest import padded_batch, tiny_model
    from transformers import BertModel

    import hf_sparse_attn
    from hf_sparse_attn.attention import WEIGHTS_ATTR

    model = hf_sparse_attn.patch_model(tiny_model(BertModel), sparsity=0.5)
    layers = [m for m in model.modules() if hasattr(m, RATE_ATTR)]
    with returning_weights(model):
        with returning_weights(model):
            assert all(getattr(m, WEIGHTS_ATTR) for m in layers)
        assert all(getattr(m, WEIGHTS_ATTR) for m in layers)  # the inner block does not switch the outer one off
        assert len(hf_sparse_attn.measure_sparsity(model, padded_batch())) == 2  # uses returning_weights inside
        assert all(getattr(m, WEIGHTS_ATTR) for m in layers)
    assert not any(hasattr(m, WEIGHTS_ATTR) for m in layers)


def test_additive_mask_cutoff_is_half_of_finfo_min():
    """At or below finfo(dtype).min / 2 a key is masked (out of the quantile); just above it is a valid key."""
    module = attention_module(0.5, causal=False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        cutoff = torch.tensor(additive_mask_cutoff(dtype), dtype=dtype)
        above = torch.nextafter(cutoff, torch.tensor(0.0, dtype=dtype))
        mask = torch.stack([cutoff, above, torch.tensor(float("-inf"), dtype=dtype), torch.tensor(0.0, dtype=dtype)])
        valid, bias = mask_parts(mask, module, 1, 4, torch.device("cpu"))
        assert valid.tolist() == [False, True, False, True] and bias is mask


@settings(max_examples=40, deadline=None)
@given(
    pattern=st.lists(st.booleans(), min_size=7, max_size=7).filter(any),
    masked_value=st.sampled_from([torch.finfo(torch.float64).min, float("-inf")]),  # float64 inputs
    shift=st.floats(-50, 50),
    rate=st.floats(0, 1),
)
def test_mask_formats_agree_and_a_constant_bias_changes_nothing(pattern, masked_value, shift, rate):
    """Invariants: the same keys masked as bool or as finfo.min / -inf give identical results; adding one constant
    to every key of a row (a bias that does not discriminate) leaves r-softmax unchanged, as it leaves softmax."""
    q, k, v = (t.double() for t in qkv())
    module = attention_module(rate, causal=False)
    allowed = torch.tensor(pattern)[None, None, None, :].expand(2, 1, 5, 7)  # (B, 1, T, S)
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, masked_value)
    out_bool, w_bool = sparse_attention_forward(module, q, k, v, allowed, scaling=0.3)
    out_add, w_add = sparse_attention_forward(module, q, k, v, additive, scaling=0.3)
    assert torch.equal(out_add, out_bool) and torch.equal(w_add, w_bool)
    out_shift, w_shift = sparse_attention_forward(module, q, k, v, additive + shift, scaling=0.3)
    # exact in real arithmetic; in float64 the rounding of the shifted scores can move the entry sitting at the
    # quantile across it, and that entry holds about eps / t of the row (eps = 1e-8, t = the row's margin)
    tolerance = 1e2 * getattr(module, EPS_ATTR)
    torch.testing.assert_close(w_shift, w_bool, rtol=0, atol=tolerance)
    torch.testing.assert_close(out_shift, out_bool, rtol=0, atol=tolerance * v.abs().max().item())
