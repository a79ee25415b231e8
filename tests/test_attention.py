"""The attention function accepts every mask format transformers may hand it, and matches a dense reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_sparse_attn.attention import EPS_ATTR, RATE_ATTR, boolean_mask, sparse_attention_forward
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


@pytest.mark.parametrize("rate", [None, 0.5, torch.tensor([0.0, 0.5, 1.0])], ids=["softmax", "r0.5", "per-head"])
def test_boolean_additive_and_implicit_causal_masks_agree(rate):
    q, k, v = qkv()
    module = attention_module(rate, causal=True)
    allowed = causal_allowed(5, 7)[None, None].expand(2, 1, 5, 7)  # (B, 1, T, S)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out_bool, w_bool = sparse_attention_forward(module, q, k, v, allowed, scaling=0.3)
    out_add, w_add = sparse_attention_forward(module, q, k, v, additive, scaling=0.3)
    out_none, w_none = sparse_attention_forward(module, q, k, v, None, scaling=0.3)
    for out, weights in [(out_add, w_add), (out_none, w_none)]:
        torch.testing.assert_close(out, out_bool, atol=0, rtol=0)
        torch.testing.assert_close(weights, w_bool, atol=0, rtol=0)
    assert out_bool.shape == (2, 5, 3, 8)  # (B, T, H, D)
    assert torch.all(w_bool[..., ~causal_allowed(5, 7)] == 0)


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
    out, weights = sparse_attention_forward(attention_module(rate, causal=False), q, k, v, valid)
    assert torch.isfinite(out).all()
    assert torch.all(weights[0, :, 2] == 0) and torch.all(out[0, 2] == 0)


def test_mask_builder_always_materialises_a_boolean_mask():
    mask = boolean_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    assert mask is not None and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], causal_allowed(4, 4))  # default mask function is causal


def test_half_precision_scores_stay_finite():
    q, k, v = (t.to(torch.bfloat16) * 30 for t in qkv())
    out, weights = sparse_attention_forward(attention_module(0.5, causal=True), q, k, v, None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(weights.float().sum(-1), torch.ones(2, 3, 5), atol=2e-2, rtol=0)
