"""PatchConfig validation, per-layer resolution and serialisation."""

from __future__ import annotations

import json
import math

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
        ({"knot_range": 0.0}, "knot_range must be a positive"),
        ({"eps": -1e-8}, "eps must be a positive"),
    ],
    ids=["head", "mixtures", "knots", "range", "eps"],
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
