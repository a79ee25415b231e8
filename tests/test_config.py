"""PatchConfig validation, per-layer resolution and serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hf_sparse_attn.config import PatchConfig, layer_rates


@pytest.mark.parametrize(
    "sparsity, expected",
    [
        (0.5, [0.5, 0.5, 0.5]),
        (None, [None, None, None]),
        ([None, 0.2, 1.0], [None, 0.2, 1.0]),
        ({1: 0.3}, [None, 0.3, None]),
        ({-1: 0.3}, [None, None, 0.3]),
        ([[0.1, 0.2], None, 0.5], [[0.1, 0.2], None, 0.5]),
        ([torch.tensor([0.1, 0.2]), None, 0], [[pytest.approx(0.1), pytest.approx(0.2)], None, 0.0]),
    ],
    ids=["float", "none", "list", "dict", "dict-negative", "per-head-list", "per-head-tensor"],
)
def test_layer_rates_resolve(sparsity, expected):
    assert layer_rates(sparsity, 3) == expected


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, [0.2, 2.0], {0: -1.0}], ids=["neg", "gt1", "nan", "list", "dict"])
def test_rate_out_of_range_is_value_error(bad):
    with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\]"):
        PatchConfig(sparsity=bad)


@pytest.mark.parametrize("bad", ["0.5", True, object(), {"a": 0.1}], ids=["str", "bool", "object", "dict-key"])
def test_rate_wrong_type_is_type_error(bad):
    with pytest.raises(TypeError, match="sparsity"):
        PatchConfig(sparsity=bad)


def test_wrong_list_length_names_layer_count():
    with pytest.raises(ValueError, match="3 layers, got 2 entries"):
        layer_rates([0.1, 0.2], 3)


def test_missing_layer_index_lists_valid_range():
    with pytest.raises(ValueError, match=r"layer index 5 does not exist.*0\.\.2"):
        layer_rates({5: 0.1}, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "sparsemax"}, "head must be None or one of"),
        ({"num_mixtures": 0}, "num_mixtures must be an int >= 1"),
        ({"num_knots": 1}, "num_knots must be an int >= 2"),
        ({"knot_range": 0.0}, "knot_range must be a float in"),
        ({"knot_range": 1e39}, "knot_range must be a float in .*finite"),
        ({"knot_range": math.inf}, "knot_range must be a float in"),
        ({"eps": -1e-8}, "eps must be a float in"),
        ({"eps": 1.0}, "eps must be a float in"),
        ({"eps": 1e-45}, "eps must be a float in .*normal float32"),
        ({"eps": math.nan}, "eps must be a float in"),
    ],
    ids=[
        "head",
        "mixtures",
        "knots",
        "range-zero",
        "range-overflow",
        "range-inf",
        "eps-neg",
        "eps-one",
        "eps-subnormal",
        "eps-nan",
    ],
)
def test_head_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchConfig(**kwargs)


def test_round_trip_through_json_keeps_everything():
    config = PatchConfig(sparsity={0: 0.5, 2: [0.1, 0.9]}, head="moss", num_mixtures=3)
    again = PatchConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert again.version == config.version != ""


def test_unknown_keys_warn_by_name():
    data = {**PatchConfig(sparsity=0.5).to_dict(), "future_option": 1}
    with pytest.warns(UserWarning, match="future_option"):
        config = PatchConfig.from_dict(data)
    assert config.sparsity == 0.5


def test_bytes_rate_is_a_type_error_not_its_character_codes():
    with pytest.raises(TypeError, match="got bytes"):
        PatchConfig(sparsity=b"0.5")


def test_rate_tensor_requiring_grad_is_rejected():
    with pytest.raises(ValueError, match="requires grad.*learnable rates are not supported"):
        PatchConfig(sparsity=[torch.tensor([0.5, 0.25], requires_grad=True), None])


@pytest.mark.parametrize("sparsity", [{0: 0.5, -2: 0.9}, {1: 0.5, -1: 0.5}, {"1": 0.5, 1: 0.2}], ids=str)
def test_dict_keys_naming_the_same_layer_raise(sparsity):
    with pytest.raises(ValueError, match="both name layer"):
        layer_rates(sparsity, 2)


def test_numpy_scalars_become_python_numbers_that_json_can_write():
    config = PatchConfig(
        num_mixtures=np.int64(3), num_knots=np.int32(10), knot_range=np.float32(5), eps=np.float64(1e-6)
    )
    assert (config.num_mixtures, config.num_knots, config.knot_range, config.eps) == (3, 10, 5.0, 1e-6)
    assert all(type(v) in (int, float) for v in (config.num_mixtures, config.num_knots, config.knot_range, config.eps))
    assert PatchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("entry", ["0.5", [0.5, None], 0.5], ids=["str", "list", "float"])
def test_non_object_config_entry_is_a_clear_type_error(entry):
    with pytest.raises(TypeError, match='"hf_sparse_attn" entry must be a JSON object'):
        PatchConfig.from_dict(entry)


def test_eps_and_knot_range_bounds_are_where_the_math_breaks():
    """At the documented limits the ops stay finite and keep their guarantees; one step outside they do not."""
    from hf_sparse_attn.config import EPS_BOUNDS, KNOT_RANGE_BOUNDS
    from hf_sparse_attn.ops.monotonic import monotonic_transform
    from hf_sparse_attn.ops.r_softmax import r_softmax

    z = torch.linspace(-30, 30, 61)
    for knot_range in KNOT_RANGE_BOUNDS:  # identity at initialisation (theta = 0), finite
        assert torch.equal(monotonic_transform(z, torch.zeros(9), knot_range), z)
    assert torch.isnan(monotonic_transform(z, torch.zeros(9), 1e39)).any()  # the reported failure beyond the bound
    scores = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    for eps in EPS_BOUNDS:  # r = 1 keeps only the maximum, which gets all the mass
        torch.testing.assert_close(r_softmax(scores, 1.0, eps=eps), torch.tensor([[1.0, 0, 0, 0, 0]]), atol=0, rtol=0)
    close = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0]])  # attention-like spacing: eps = 1 keeps every key
    assert int((r_softmax(close, 0.5, eps=1.0) == 0).sum()) == 0
    assert int((r_softmax(close, 0.5, eps=EPS_BOUNDS[1]) == 0).sum()) == 2  # floor(0.5 * (5 - 1))
