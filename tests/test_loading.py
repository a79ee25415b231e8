"""Trust in patching and loading: the instance is the source of truth, every load path runs the stored patch or says
why not, models never share state, failed patches change nothing, and the load report keeps what matters."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, padded_batch, tiny_model, word_tokenizer
from safetensors.torch import load_file, save_file
from transformers.trainer_callback import TrainerControl, TrainerState

import hf_sparse_attn
from hf_sparse_attn import heads
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.attention import ATTENTION_ALIAS, ATTENTION_NAME
from hf_sparse_attn.training import SparsityScheduleCallback

#: one model per architecture whose output is its attention's, plus an LM per architecture for the heads
CLASSIFIERS = [
    transformers.BertForSequenceClassification,
    transformers.RobertaForSequenceClassification,
    transformers.GPT2LMHeadModel,
]
LMS = [transformers.GPT2LMHeadModel, transformers.BertForMaskedLM, transformers.RobertaForMaskedLM]
#: distinct rates per layer and per head, so that a wrong layer or head assignment changes the outputs
SPARSITY = [0.5, [0.25, 0.5, 0.75, 1.0]]


def ids(cls: type) -> str:
    return cls.__name__


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def patched_state(model) -> dict:
    """Everything a patch touches: parameters and buffers, config, attention modules' attributes, the head."""
    return {
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "config_object": model.config,
        "implementation": model.config._attn_implementation,
        "modules": [{k: v for k, v in vars(m).items() if "hf_sparse_attn" in k} for m in self_attention_modules(model)],
        "model_attributes": {k: v for k, v in vars(model).items() if "hf_sparse_attn" in k},
        "head": type(model.get_output_embeddings()),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["state_dict"].keys() == after["state_dict"].keys()
    for name, tensor in before["state_dict"].items():
        assert torch.equal(tensor, after["state_dict"][name]), name
    assert before["config"] == after["config"]
    assert before["config_object"] is after["config_object"]
    assert before["implementation"] == after["implementation"]
    assert len(before["modules"]) == len(after["modules"])
    for old, new in zip(before["modules"], after["modules"], strict=True):
        assert old.keys() == new.keys()
        for key in old:
            same = torch.equal(old[key], new[key]) if torch.is_tensor(old[key]) else old[key] == new[key]
            assert same, key
    assert before["model_attributes"].keys() == after["model_attributes"].keys()
    assert before["head"] is after["head"]


# ---------------------------------------------------------------------------------------------------------------
# Item 2: the registered name alone runs the stored patch


@pytest.mark.parametrize("name", [ATTENTION_NAME, ATTENTION_ALIAS])
@pytest.mark.parametrize("model_class", CLASSIFIERS, ids=ids)
def test_registered_name_alone_runs_the_stored_patch(model_class, name, batch, tmp_path):
    softmax = tiny_model(model_class)
    expected_softmax = run(softmax, batch)
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=SPARSITY)
    model.save_pretrained(tmp_path)
    expected = run(model, batch)
    assert not torch.allclose(expected, expected_softmax)  # the rates matter for these inputs

    loaded = model_class.from_pretrained(tmp_path, attn_implementation=name).eval()
    torch.testing.assert_close(run(loaded, batch), expected, atol=0, rtol=0)


def test_pipeline_with_the_alias_runs_the_stored_patch(tmp_path):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=SPARSITY)
    model.save_pretrained(tmp_path)
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    text = "w3 w14 w15 w92 w26 w5 w7 w8"
    with torch.no_grad():
        expected = model(**tokenizer(text, return_tensors="pt")).last_hidden_state
    pipe = transformers.pipeline(
        "feature-extraction", model=str(tmp_path), model_kwargs={"attn_implementation": ATTENTION_ALIAS}
    )
    torch.testing.assert_close(pipe(text, return_tensors=True), expected, atol=0, rtol=0)


@pytest.mark.parametrize("model_class", LMS, ids=ids)
def test_plain_load_of_a_stored_head_warns_loudly(model_class, batch, tmp_path):
    hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5, head="plif", num_knots=10).save_pretrained(
        tmp_path
    )
    loaded = model_class.from_pretrained(tmp_path, attn_implementation=ATTENTION_ALIAS).eval()
    with pytest.warns(UserWarning, match=r"'plif' LM head.*hf_sparse_attn\.from_pretrained"):
        run(loaded, batch)
    with warnings.catch_warnings():  # the head rebuilt: nothing to warn about
        warnings.simplefilter("error")
        run(hf_sparse_attn.from_pretrained(tmp_path), batch)


def test_generation_with_kv_cache_runs_the_stored_patch(tmp_path):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=SPARSITY)
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation=ATTENTION_ALIAS).eval()
    softmax = tiny_model(transformers.GPT2LMHeadModel)
    prompt = padded_batch(batch_size=1, length=5)["input_ids"]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2, "output_scores": True,
              "return_dict_in_generate": True}  # fmt: skip
    expected, got = model.generate(prompt, **kwargs), loaded.generate(prompt, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(expected.scores), atol=0, rtol=0)
    assert not torch.equal(torch.stack(softmax.generate(prompt, **kwargs).scores), torch.stack(expected.scores))


def test_cross_attention_stays_softmax_under_the_stored_patch(tmp_path):
    """A BERT decoder with cross-attention loaded by name: the stored rates go to self-attention only."""
    config = transformers.BertConfig(**TINY_CONFIGS["bert"][1], is_decoder=True, add_cross_attention=True)
    torch.manual_seed(0)
    model = hf_sparse_attn.patch_model(transformers.BertModel(config).eval(), sparsity=0.5)
    model.save_pretrained(tmp_path)
    batch = padded_batch()
    encoder = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    loaded = transformers.BertModel.from_pretrained(tmp_path, attn_implementation=ATTENTION_NAME).eval()
    with torch.no_grad():
        expected = model(**batch, encoder_hidden_states=encoder).last_hidden_state
        torch.testing.assert_close(
            loaded(**batch, encoder_hidden_states=encoder).last_hidden_state, expected, atol=0, rtol=0
        )


# ---------------------------------------------------------------------------------------------------------------
# Item 3: "patched" is a property of the instance


@pytest.mark.parametrize("model_class", CLASSIFIERS, ids=ids)
def test_plain_loaded_patched_checkpoint_is_not_patched(model_class, batch, tmp_path):
    hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5).save_pretrained(tmp_path)
    plain = model_class.from_pretrained(tmp_path).eval()  # transformers' default SDPA: softmax
    stored = dict(plain.config.hf_sparse_attn)
    with pytest.raises(ValueError, match=r"not patched.*hf_sparse_attn\.from_pretrained\(path\)"):
        hf_sparse_attn.get_patch_config(plain)
    with pytest.raises(ValueError, match=r"set_sparsity: .*not patched"):
        hf_sparse_attn.set_sparsity(plain, 0.9)
    assert plain.config.hf_sparse_attn == stored  # not rewritten
    callback = SparsityScheduleCallback(0.5, warmup_steps=4)
    with pytest.raises(ValueError, match="not patched"):
        callback.on_train_begin(None, TrainerState(), TrainerControl(), model=plain)

    softmax_output = run(plain, batch)
    hf_sparse_attn.unpatch_model(plain)  # drops the entry the instance never ran
    assert hf_sparse_attn.get_patch_config(plain) is None
    assert not hasattr(plain.config, "hf_sparse_attn")
    torch.testing.assert_close(run(plain, batch), softmax_output, atol=0, rtol=0)
    plain.save_pretrained(tmp_path / "plain")
    assert "hf_sparse_attn" not in json.loads((tmp_path / "plain" / "config.json").read_text())


@pytest.mark.parametrize("model_class", CLASSIFIERS, ids=ids)
def test_plain_loaded_checkpoint_can_be_patched_and_unpatched(model_class, batch, tmp_path):
    hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5).save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path, attn_implementation=ATTENTION_ALIAS).eval()
    softmax = tiny_model(model_class)
    hf_sparse_attn.patch_model(loaded, sparsity=0.25)
    assert hf_sparse_attn.get_patch_config(loaded).sparsity == 0.25
    reference = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.25)
    torch.testing.assert_close(run(loaded, batch), run(reference, batch), atol=0, rtol=0)
    hf_sparse_attn.unpatch_model(loaded)
    assert loaded.config._attn_implementation == "sdpa"
    torch.testing.assert_close(run(loaded, batch), run(softmax, batch), atol=0, rtol=0)


def test_schedule_callback_reads_the_instance(tmp_path):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=0.0)
    SparsityScheduleCallback(0.8, warmup_steps=4).on_train_begin(
        None, TrainerState(global_step=2), TrainerControl(), model=model
    )
    assert hf_sparse_attn.get_patch_config(model).sparsity == pytest.approx([0.4, 0.4])
    assert model.config.hf_sparse_attn["sparsity"] == pytest.approx([0.4, 0.4])


# ---------------------------------------------------------------------------------------------------------------
# Item 4: models sharing one config object


@pytest.mark.parametrize("model_type", TINY_CONFIGS)
def test_models_sharing_a_config_never_affect_each_other(model_type, batch, tmp_path):
    config_class, kwargs = TINY_CONFIGS[model_type]
    shared = config_class(**kwargs)
    model_class = {"gpt2": transformers.GPT2LMHeadModel}.get(model_type, transformers.AutoModelForMaskedLM)
    torch.manual_seed(0)
    first = (transformers.GPT2LMHeadModel(shared) if model_type == "gpt2" else model_class.from_config(shared)).eval()
    torch.manual_seed(1)
    second = (transformers.GPT2LMHeadModel(shared) if model_type == "gpt2" else model_class.from_config(shared)).eval()
    second_softmax = run(second, batch)

    hf_sparse_attn.patch_model(first, sparsity=0.3, head="plif", num_knots=10)
    assert second.config._attn_implementation != ATTENTION_NAME
    assert not hasattr(second.config, "hf_sparse_attn")
    torch.testing.assert_close(run(second, batch), second_softmax, atol=0, rtol=0)

    hf_sparse_attn.patch_model(second, sparsity=0.9)
    hf_sparse_attn.set_sparsity(second, 0.8)
    first_output = run(first, batch)
    first.save_pretrained(tmp_path)
    again = hf_sparse_attn.from_pretrained(tmp_path)
    assert hf_sparse_attn.get_patch_config(again).sparsity == 0.3
    torch.testing.assert_close(run(again.eval(), batch), first_output, atol=0, rtol=0)

    hf_sparse_attn.unpatch_model(second)
    assert first.config._attn_implementation == ATTENTION_NAME
    assert hf_sparse_attn.get_patch_config(first).sparsity == 0.3
    torch.testing.assert_close(run(first, batch), first_output, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Item 5: validate everything, then apply


def _failing_build_head(*args, **kwargs):
    raise RuntimeError("simulated out of memory while building the head")


FAILURES = {
    "list-length": ({"sparsity": [0.1] * 5}, ValueError),
    "per-head-length": ({"sparsity": [[0.1, 0.2], None]}, ValueError),
    "duplicate-layer": ({"sparsity": {0: 0.5, -2: 0.9}}, ValueError),
    "knot-range-overflow": ({"sparsity": 0.5, "head": "plif", "knot_range": 1e39}, ValueError),
    "eps": ({"sparsity": 0.5, "eps": 1.0}, ValueError),
    "unknown-option": ({"sparsity": 0.5, "mixtures": 3}, TypeError),
    "head-build-fails": ({"sparsity": 0.5, "head": "mos"}, RuntimeError),
}


@pytest.mark.parametrize("already_patched", [False, True], ids=["plain", "patched"])
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("model_class", LMS, ids=ids)
def test_failed_patch_leaves_the_model_exactly_as_before(model_class, failure, already_patched, monkeypatch):
    model = tiny_model(model_class)
    if already_patched:
        hf_sparse_attn.patch_model(model, sparsity=[0.3, None], head="plif", num_knots=10)
        with torch.no_grad():
            model.get_output_embeddings().extra.theta.normal_()
    before = patched_state(model)
    kwargs, error = FAILURES[failure]
    if failure == "head-build-fails":
        monkeypatch.setattr(heads, "build_head", _failing_build_head)
    with pytest.raises(error):
        hf_sparse_attn.patch_model(model, **kwargs)
    assert_same_state(before, patched_state(model))


def test_numpy_head_options_patch_and_save(tmp_path, batch):
    model = hf_sparse_attn.patch_model(
        tiny_model(transformers.GPT2LMHeadModel), sparsity=np.float32(0.5), head="plif", knot_range=np.float32(5),
        num_knots=np.int64(10),
    )  # fmt: skip
    assert type(model.get_output_embeddings()) is heads.MonotonicHead
    assert model.get_output_embeddings().extra.knot_range == 5.0
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(run(hf_sparse_attn.from_pretrained(tmp_path), batch), run(model, batch))


# ---------------------------------------------------------------------------------------------------------------
# Item 6: the load report keeps everything but the head's own keys


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_report():
    """The messages transformers logs at warning level while the test runs."""
    handler = _Records()
    logger = logging.getLogger("transformers.modeling_utils")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
    transformers.logging.set_verbosity(verbosity)


@pytest.mark.parametrize("model_class", LMS, ids=ids)
def test_load_report_keeps_missing_base_weights_and_drops_head_keys(model_class, tmp_path, load_report):
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5, head="plif", num_knots=10)
    model.save_pretrained(tmp_path)
    hf_sparse_attn.from_pretrained(tmp_path)
    assert not any("LOAD REPORT" in message for message in load_report)  # a clean checkpoint: nothing to report

    weights = load_file(tmp_path / "model.safetensors")
    base_weight = next(n for n in weights if n.endswith((".0.mlp.c_fc.weight", ".0.intermediate.dense.weight")))
    del weights[base_weight]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    hf_sparse_attn.from_pretrained(tmp_path)
    (report,) = [message for message in load_report if "LOAD REPORT" in message]
    assert base_weight in report and "MISSING" in report
    assert "extra.theta" not in report


# ---------------------------------------------------------------------------------------------------------------
# Item 7: read the weights transformers reads


def test_stale_shard_index_is_ignored_as_transformers_ignores_it(tmp_path, batch):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5, head="plif")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        model.get_output_embeddings().extra.theta.normal_()
    model.save_pretrained(tmp_path)  # unsharded: model.safetensors next to the old index
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(plain.transformer.wte.weight, model.transformer.wte.weight, atol=0, rtol=0)
    again = hf_sparse_attn.from_pretrained(tmp_path)
    torch.testing.assert_close(run(again, batch), run(model, batch), atol=0, rtol=0)


def test_sharded_checkpoint_loads_the_head_from_its_shard(tmp_path, batch):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5, head="plif")
    with torch.no_grad():
        model.get_output_embeddings().extra.theta.normal_()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert not (tmp_path / "model.safetensors").exists()
    torch.testing.assert_close(run(hf_sparse_attn.from_pretrained(tmp_path), batch), run(model, batch), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Edited or hand-written config.json entries


def _edit_patch_entry(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    config["hf_sparse_attn"] = edit(config["hf_sparse_attn"])
    (path / "config.json").write_text(json.dumps(config))


def test_edited_num_mixtures_is_a_clear_error(tmp_path):
    hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), head="mos", num_mixtures=2).save_pretrained(
        tmp_path
    )
    _edit_patch_entry(tmp_path, lambda entry: {**entry, "num_mixtures": 3})
    with pytest.raises(ValueError, match=r"num_mixtures=3.*edited.*extra\.prior: \(2, 32\) in the checkpoint"):
        hf_sparse_attn.from_pretrained(tmp_path)


@pytest.mark.parametrize("entry", ["0.5", [0.5, None]], ids=["string", "list"])
def test_non_object_patch_entry_is_a_clear_error(entry, tmp_path):
    hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=0.5).save_pretrained(tmp_path)
    _edit_patch_entry(tmp_path, lambda _: entry)
    with pytest.raises(TypeError, match='"hf_sparse_attn" entry must be a JSON object'):
        hf_sparse_attn.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Item 8: resize_token_embeddings keeps the head


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("model_class", LMS, ids=ids)
def test_resize_token_embeddings_keeps_the_head(model_class, tied, tmp_path):
    model = hf_sparse_attn.patch_model(
        tiny_model(model_class, tie_word_embeddings=tied), sparsity=0.5, head="plif", num_knots=10
    )
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.extra.theta.normal_()
    theta = head.extra.theta.detach().clone()
    model.resize_token_embeddings(120)

    resized = model.get_output_embeddings()
    assert type(resized) is heads.MonotonicHead
    assert torch.equal(resized.extra.theta, theta)
    assert resized.out_features == resized.weight.shape[0] == model.config.vocab_size == 120
    assert (resized.weight is model.get_input_embeddings().weight) == tied
    assert hf_sparse_attn.get_patch_config(model).head == "plif"
    hidden = torch.randn(2, 32)
    logits = torch.nn.functional.linear(hidden, resized.weight, resized.bias)  # the plain layer by hand
    expected = hf_sparse_attn.ops.monotonic.monotonic_transform(logits, theta, 20.0).log_softmax(-1)
    torch.testing.assert_close(resized(hidden), expected)

    if model_class is transformers.RobertaForMaskedLM and not tied:
        return  # transformers 5.23 itself cannot reload this one: the resize leaves lm_head.bias at the old size
    batch = padded_batch(vocab_size=120)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(run(hf_sparse_attn.from_pretrained(tmp_path), batch), run(model, batch), atol=0, rtol=0)
