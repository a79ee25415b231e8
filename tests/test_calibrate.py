"""Calibration of the r-softmax rate from data: budget on held-out data, monotonicity, target sparsity, the report,
the heat map and card, the schedule callback, and the ``hf-sparse-attn calibrate`` command."""

from __future__ import annotations

import functools
import json
import math
import sys

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model, word_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_sparse_attn
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.attention import RATE_ATTR
from hf_sparse_attn.calibrate import RateSearch, calibrate, measure_calibration
from hf_sparse_attn.calibration_report import CARD_END, CARD_START, CalibrationReport, add_to_card
from hf_sparse_attn.commands import cli
from hf_sparse_attn.publishing import hub
from hf_sparse_attn.training import SparsityScheduleCallback

MODELS = {
    "bert": transformers.BertModel,
    "roberta": transformers.RobertaForMaskedLM,
    "gpt2": transformers.GPT2LMHeadModel,
}
#: standard errors by which a held-out estimate may exceed the budget: a one-sided z = 3 bound (p ~ 0.0013) on the
#: difference of two independent means, the calibration estimate (<= budget) and the held-out one
HELD_OUT_Z = 3.0


def batches(seed: int, count: int = 4, size: int = 6, length: int = 16) -> list[dict[str, torch.Tensor]]:
    """Padded batches of random tokens (every row but the first right-padded)."""
    return [padded_batch(size, length, seed=seed * 100 + i) for i in range(count)]


def concatenated(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


@functools.cache
def search(name: str, granularity: str = "head") -> RateSearch:
    """One search per model type, shared by the tests (and hypothesis examples) that only read it."""
    return RateSearch(tiny_model(MODELS[name]), batches(seed=1), granularity=granularity)


def current_rates(model) -> list:
    rates = [getattr(module, RATE_ATTR, None) for module in self_attention_modules(model)]
    return [rate.tolist() if isinstance(rate, torch.Tensor) else rate for rate in rates]


def assert_same_rates(actual: list, expected: list) -> None:
    """Equal per layer; a per-head rate read back from its float32 tensor equals the float within float32 rounding."""
    assert [rate is None for rate in actual] == [rate is None for rate in expected]
    for a, b in zip(actual, expected, strict=True):
        if b is not None:
            assert a == pytest.approx(b, rel=torch.finfo(torch.float32).eps)


def elementwise_le(low: list, high: list) -> bool:
    """Every rate of ``low`` is at most that of ``high`` (softmax, None, below any rate)."""
    for a, b in zip(low, high, strict=True):
        if a is None:
            continue
        if b is None:
            return False
        a_heads, b_heads = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
        if any(x > y for x, y in zip(a_heads, b_heads, strict=True)):
            return False
    return True


@pytest.mark.parametrize("name", sorted(MODELS))
def test_budget_is_respected_on_held_out_batches(name):
    model = tiny_model(MODELS[name])
    calibration, held_out = batches(seed=1), batches(seed=2)
    budget = measure_calibration(model, calibration, 0.5).output_change  # what a uniform r = 0.5 costs here
    rates = calibrate(model, calibration, budget=budget, granularity="head")
    report = rates.report
    assert report.output_change <= budget
    assert report.mean_sparsity > 0
    check = measure_calibration(model, held_out, rates)
    tolerance = HELD_OUT_Z * math.hypot(report.output_change_se, check.output_change_se)
    assert check.output_change <= budget + tolerance


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bisection_ends_next_to_a_point_over_budget(name):
    rate_search = search(name)
    budget = rate_search.output_change(rate_search.path_length // 2)[0]
    index = rate_search.index_for_budget(budget)
    assert rate_search.output_change(index)[0] <= budget
    assert index == rate_search.path_length or rate_search.output_change(index + 1)[0] > budget


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.0, 1.2), min_size=2, max_size=6), st.sampled_from(sorted(MODELS)))
def test_larger_budget_never_lowers_the_rates_or_the_mean_sparsity(fractions, name):
    rate_search = search(name)
    scale = rate_search.output_change(rate_search.path_length)[0]  # budgets from 0 to 1.2 x the largest change
    solved = [rate_search.solve(budget=fraction * scale) for fraction in sorted(fractions)]
    for smaller, larger in zip(solved, solved[1:], strict=False):
        assert elementwise_le(list(smaller), list(larger))
        assert smaller.report.mean_sparsity <= larger.report.mean_sparsity


def test_fresh_calibrations_are_monotone_in_the_budget():
    model, data = tiny_model(transformers.GPT2LMHeadModel), batches(seed=1, count=2)
    sparsity = [calibrate(model, data, budget=b).report.mean_sparsity for b in (1e-5, 1e-4, 1e-3)]
    assert sparsity == sorted(sparsity)


@pytest.mark.parametrize("granularity", ["head", "layer"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_target_sparsity_is_reached_as_measure_sparsity_counts_it(name, granularity):
    model, data = tiny_model(MODELS[name]), batches(seed=1)
    rates = calibrate(model, data, target_sparsity=0.4, granularity=granularity)
    patched = hf_sparse_attn.patch_model(tiny_model(MODELS[name]), sparsity=rates)
    per_layer = hf_sparse_attn.measure_sparsity(patched, concatenated(data))
    measured = sum(per_layer) / len(per_layer)
    assert measured == pytest.approx(rates.report.mean_sparsity, abs=1e-6)
    assert measured >= 0.4 - 1e-6
    rate_search = RateSearch(model, data, granularity=granularity)
    index = rate_search.index_for_sparsity(0.4)
    assert rate_search.path_sparsity[index - 1] < 0.4  # the first point that reaches it


@pytest.mark.parametrize("name", sorted(MODELS))
def test_report_matches_independent_measurements(name):
    """Zero fractions as ``measure_sparsity`` counts them (causal rows: past keys only); the output change as a
    separate measurement of the same rates finds it; the rates patch the model."""
    data = batches(seed=1)
    rates = search(name).solve(budget=search(name).output_change(search(name).path_length // 3)[0])
    report = rates.report
    patched = hf_sparse_attn.patch_model(tiny_model(MODELS[name]), sparsity=rates)
    assert_same_rates(current_rates(patched), rates)
    measured = hf_sparse_attn.measure_sparsity(patched, concatenated(data))
    assert report.layer_sparsity == pytest.approx(measured, abs=1e-6)
    again = measure_calibration(tiny_model(MODELS[name]), data, rates)
    assert again.output_change == pytest.approx(report.output_change, rel=1e-4)
    assert sum(again.zero_fraction, []) == pytest.approx(sum(report.zero_fraction, []), abs=1e-6)


def test_causal_rows_have_fewer_zeros_than_encoder_rows_at_the_same_rate():
    """r-softmax zeros about r (k - 1) of k valid keys: GPT-2's row i has i + 1 keys, BERT's all of them."""
    data = [padded_batch(4, 16, seed=0)]
    encoder = measure_calibration(tiny_model(transformers.BertModel), data, 0.5)
    decoder = measure_calibration(tiny_model(transformers.GPT2LMHeadModel), data, 0.5)
    lengths = data[0]["attention_mask"].sum(-1).tolist()

    def expected(keys_per_row):  # floor(r (k - 1)) zeros, plus the key at the quantile when it falls on one
        return [math.floor(0.5 * (k - 1)) / k for k in keys_per_row]

    assert decoder.mean_sparsity < encoder.mean_sparsity
    causal_rows = [f for n in lengths for f in expected(range(1, n + 1))]
    encoder_rows = [f for n in lengths for f in expected([n] * n)]
    assert decoder.mean_sparsity >= sum(causal_rows) / len(causal_rows)
    assert encoder.mean_sparsity >= sum(encoder_rows) / len(encoder_rows)


def test_layer_granularity_gives_one_rate_per_layer():
    rates = search("bert", "layer").solve(target_sparsity=0.5)
    assert all(rate is None or isinstance(rate, float) for rate in rates)
    assert any(rate is not None for rate in rates)


def test_per_head_rates_are_lists_of_grid_values():
    rate_search = search("gpt2")
    rates = rate_search.solve(target_sparsity=0.5)
    sparse = [rate for rate in rates if rate is not None]
    assert sparse and all(isinstance(rate, list) and len(rate) == 4 for rate in sparse)
    assert {r for rate in sparse for r in rate} <= set(rate_search.level_rates)


@pytest.mark.parametrize("patched", [False, True])
def test_model_is_left_as_it_was(patched):
    model = tiny_model(transformers.GPT2LMHeadModel).train()
    if patched:
        hf_sparse_attn.patch_model(model, sparsity=[0.3, None], head="sigsoftmax")
    config = hf_sparse_attn.get_patch_config(model)
    implementation, rates = model.config._attn_implementation, current_rates(model)
    probe = padded_batch(2, 10, seed=5)
    model.eval()
    before = model(**probe).logits
    model.train()
    calibrate(model, batches(seed=1, count=2), target_sparsity=0.3)
    assert model.training
    assert model.config._attn_implementation == implementation
    assert hf_sparse_attn.get_patch_config(model) == config
    assert current_rates(model) == rates
    model.eval()
    assert torch.equal(model(**probe).logits, before)


def test_schedule_callback_warms_up_to_the_calibrated_rates():
    rates = search("bert").solve(target_sparsity=0.5)
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=rates)
    callback = SparsityScheduleCallback(rates, warmup_steps=4)
    args, control = TrainingArguments("unused", report_to=[], use_cpu=True), TrainerControl()

    def scaled(factor):
        return [None if r is None else [factor * x for x in r] for r in rates]

    callback.on_train_begin(args, TrainerState(global_step=1), control, model=model)
    assert_same_rates(current_rates(model), scaled(0.25))
    callback.on_step_begin(args, TrainerState(global_step=4), control, model=model)
    assert_same_rates(current_rates(model), rates)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"granularity": "row"}, ValueError, "granularity must be one of"),
        ({"budget": -0.1}, ValueError, r"budget must lie in \[0, inf\]"),
        ({"budget": float("nan")}, ValueError, "budget must lie in"),
        ({"budget": "0.1"}, TypeError, "budget must be a number"),
        ({"budget": 0.1, "target_sparsity": 0.5}, ValueError, "either budget or target_sparsity"),
        ({"target_sparsity": 0.0}, ValueError, r"target_sparsity must lie in \(0, 1\]"),
        ({"target_sparsity": 1.5}, ValueError, "target_sparsity must lie in"),
        ({"target_sparsity": 0.99}, ValueError, "not reachable with rates up to 0.95"),
        ({"measure": "mse"}, ValueError, "measure must be one of"),
        ({"grid": [0.5, 0.25]}, ValueError, "strictly increasing"),
        ({"grid": [0.0, 0.5]}, ValueError, r"grid\[0\] must lie in \(0, 1\]"),
        ({"grid": []}, TypeError, "non-empty sequence"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        calibrate(tiny_model(transformers.BertModel), batches(seed=1, count=1), **kwargs)


@pytest.mark.parametrize(
    ("data", "match"),
    [([], "batches is empty"), ([{"attention_mask": torch.ones(2, 3)}], "'input_ids'"), ([torch.ones(2, 3)], "dict")],
)
def test_bad_batches_raise_clear_errors(data, match):
    with pytest.raises(ValueError, match=match):
        calibrate(tiny_model(transformers.BertModel), data)


def test_kl_needs_output_logits():
    with pytest.raises(ValueError, match="measure='kl' needs output logits"):
        calibrate(tiny_model(transformers.BertModel), batches(seed=1, count=1), measure="kl")


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="transformers PreTrainedModel"):
        calibrate(torch.nn.Linear(2, 2), batches(seed=1, count=1))


def test_minilm_budget_holds_on_held_out_sentences(minilm_path):
    from hf_sparse_attn.commands.demo import load_sentiment

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    model = transformers.AutoModel.from_pretrained(minilm_path)
    train, test = load_sentiment("train")[0], load_sentiment("test")[0]

    def tokenized(texts):
        return [dict(tokenizer(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, len(texts), 16)]

    rates = calibrate(model, tokenized(train[:48]), budget=0.01, granularity="head", grid=(0.25, 0.5, 0.75, 0.9))
    assert rates.report.measure == "hidden" and rates.report.mean_sparsity > 0
    check = measure_calibration(model, tokenized(test[:48]), rates)
    assert check.output_change <= 0.01 + HELD_OUT_Z * math.hypot(rates.report.output_change_se, check.output_change_se)


def test_table_heatmap_and_json_round_trip(tmp_path):
    report = search("bert").solve(target_sparsity=0.5).report
    text = report.table()
    assert "rate r" in text and "zero fraction" in text and "attention error" in text
    assert text.count("\n    1 ") == 3  # layer 1 appears in each of the three matrices
    image = report.heatmap(tmp_path / "map.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert CalibrationReport.load(report.save(tmp_path / "report.json")) == report


def test_heatmap_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = search("bert").solve(target_sparsity=0.5).report
    with pytest.raises(ImportError, match="pip install matplotlib"):
        report.heatmap(tmp_path / "map.png")


def test_card_section_survives_rerendering_and_is_not_duplicated(tmp_path):
    rates = search("gpt2").solve(target_sparsity=0.5)
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=rates)
    hub.write_model_card(model, tmp_path)
    add_to_card(tmp_path / "README.md", rates.report, "calibration.png")
    add_to_card(tmp_path / "README.md", rates.report, "calibration.png")
    hub.write_model_card(model, tmp_path)  # what `hf-sparse-attn push` does to a folder's card
    text = (tmp_path / "README.md").read_text()
    assert text.count(CARD_START) == 1 and text.count(CARD_END) == 1
    assert text.index(hub.SECTION_END) < text.index(CARD_START)
    assert "![rate, zero fraction and attention error per layer and head](calibration.png)" in text
    first_row = "| 0 | " + " | ".join(f"{r:.2f}" for r in rates[0]) + " |"
    assert first_row in text


def test_cli_writes_patched_checkpoint_card_and_report(tmp_path, capsys):
    checkpoint, out = tmp_path / "gpt2", tmp_path / "calibrated"
    tiny_model(transformers.GPT2LMHeadModel).save_pretrained(checkpoint)
    word_tokenizer().save_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{i}" for i in torch.randint(3, 99, (int(n),), generator=generator)) for n in range(4, 28)]
    (tmp_path / "sentences.txt").write_text("\n".join(lines) + "\n")
    argv = ["calibrate", str(checkpoint), "--data", str(tmp_path / "sentences.txt"), "--num-sentences", "16",
            "--held-out", "8", "--batch-size", "8", "--target-sparsity", "0.3", "--output-dir", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    assert "zero fraction among valid keys" in capsys.readouterr().out
    report = CalibrationReport.load(out / "calibration.json")
    held_out = CalibrationReport.load(out / "calibration_held_out.json")
    assert report.num_sentences == 16 and held_out.num_sentences == 8 and report.mean_sparsity >= 0.3
    assert (out / "calibration.png").is_file()
    assert "](calibration.png)" in (out / "README.md").read_text()
    again = hf_sparse_attn.from_pretrained(out)
    assert_same_rates(current_rates(again), report.rates)
    assert json.loads((out / "config.json").read_text())["hf_sparse_attn"]["sparsity"] == report.rates


def test_cli_reads_tsv_columns_and_reports_bad_input(tmp_path, capsys):
    from hf_sparse_attn.commands.calibrate import load_sentences

    (tmp_path / "data.tsv").write_text('sentence\tlabel\n"quoted start\t1\nplain\t0\n\t1\n')
    assert load_sentences(str(tmp_path / "data.tsv"), text_column="sentence") == ['"quoted start', "plain"]
    argv = ["calibrate", "unused-model", "--data", str(tmp_path / "data.tsv"), "--text-column", "text",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    assert cli.main(argv) == 2
    assert "has no column 'text'; its columns: ['sentence', 'label']" in capsys.readouterr().err


def test_evidence_driver_pairs_each_uniform_run_with_a_calibrated_one(shared_data, tmp_path):
    from benchmarks.reproduce import calibration, runner

    parser = calibration.parser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--data-dir", str(shared_data), "--results-dir", str(tmp_path), "--dry-run"])
    runs = calibration.build(args)
    uniform, calibrated = runs[0::2], runs[1::2]
    assert [(r.table, r.setting) for r in uniform[:1] + calibrated[:1]] == [
        ("glue", "sst2/r=0.5"),
        ("calibration", "sst2/calibrated"),
    ]
    assert len(runs) == 12  # SST-2 and RTE, 3 seeds, 2 methods
    for a, b in zip(uniform, calibrated, strict=True):
        assert (a.seed, a.steps, a.recipe) == (b.seed, b.steps, b.recipe)
        assert {k: v for k, v in b.config.items() if k not in ("sparsity", "calibration")} == {
            k: v for k, v in a.config.items() if k != "sparsity"
        }
        differing = [i for i, (x, y) in enumerate(zip(a.argv, b.argv, strict=True)) if x != y]
        assert [a.argv[i - 1] for i in differing] == ["--sparsity"]  # only the rate differs
    assert not list(tmp_path.rglob("*.json"))  # a dry run computes no map and trains nothing


def test_recipes_accept_the_calibrated_map_as_json():
    from hf_sparse_attn.training.recipe import parse_sparsity

    rates = search("gpt2").solve(target_sparsity=0.5)
    assert parse_sparsity(json.dumps(rates)) == list(rates)
    assert parse_sparsity('{"1": 0.5}') == {"1": 0.5}  # patch_model reads JSON's string keys as layer indices
