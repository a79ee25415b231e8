"""patch_model end to end on tiny BERT, RoBERTa and GPT-2 models of every task head, and on the real MiniLM."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model
from torch import nn

import hf_sparse_attn
from hf_sparse_attn.architectures import ARCHITECTURES, self_attention_modules
from hf_sparse_attn.attention import ATTENTION_NAME, RATE_ATTR

MODEL_CLASSES = [
    transformers.BertModel,
    transformers.BertForSequenceClassification,
    transformers.BertForTokenClassification,
    transformers.BertForMaskedLM,
    transformers.RobertaModel,
    transformers.RobertaForSequenceClassification,
    transformers.RobertaForTokenClassification,
    transformers.RobertaForMaskedLM,
    transformers.GPT2Model,
    transformers.GPT2LMHeadModel,
    transformers.GPT2ForSequenceClassification,
    transformers.GPT2ForTokenClassification,
    transformers.GPT2DoubleHeadsModel,
]


def run(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs)


def main_output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


def assert_zero_counts_follow_rate(attentions, attention_mask, rate, causal):
    """Every valid query row has floor(r·(k-1)) or one more exact zeros among its k valid keys (distinct scores),
    and no weight on invalid keys."""
    length = attention_mask.shape[1]
    positions = torch.arange(length)
    for layer in attentions:
        for b in range(layer.shape[0]):
            n_tokens = int(attention_mask[b].sum())
            for i in range(n_tokens):
                k = i + 1 if causal else n_tokens
                row = layer[b, :, i]  # (H, S)
                valid = (positions < k) if causal else (positions < n_tokens)
                assert torch.all(row[:, ~valid] == 0)
                zeros = (row[:, valid] == 0).sum(-1)
                low = math.floor(rate * (k - 1) + 1e-9)
                assert torch.all((zeros >= low) & (zeros <= low + 1)), (b, i, k, zeros.tolist())
                torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[0]))


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_sparsity_none_reproduces_the_unpatched_model(model_class, batch):
    model = tiny_model(model_class)
    expected = main_output(run(model, batch))
    hf_sparse_attn.patch_model(model, sparsity=None)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert torch.equal(main_output(run(model, batch)), expected)  # the same SDPA call with the same mask


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_rate_gives_requested_zeros_among_valid_keys(model_class, batch):
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5)
    outputs = run(model, batch, output_attentions=True)
    assert len(outputs.attentions) == model.config.num_hidden_layers
    assert torch.isfinite(main_output(outputs)).all()
    causal = model.config.model_type == "gpt2"
    assert_zero_counts_follow_rate(outputs.attentions, batch["attention_mask"], 0.5, causal)
    measured = hf_sparse_attn.measure_sparsity(model, batch)
    assert all(0.35 < s <= 0.5 for s in measured), measured


def test_per_layer_list_dict_and_per_head_rates(batch):
    model = tiny_model(transformers.BertModel)
    hf_sparse_attn.patch_model(model, sparsity=[None, 0.75])
    attn = run(model, batch, output_attentions=True).attentions
    assert (attn[0] == 0).sum() == (batch["attention_mask"][:, None, None, :] == 0).expand_as(attn[0]).sum()
    assert_zero_counts_follow_rate(attn[1:], batch["attention_mask"], 0.75, causal=False)

    hf_sparse_attn.patch_model(model, sparsity={0: 0.25})
    attn = run(model, batch, output_attentions=True).attentions
    assert_zero_counts_follow_rate(attn[:1], batch["attention_mask"], 0.25, causal=False)

    rates = [0.0, 0.25, 0.5, 1.0]
    hf_sparse_attn.patch_model(model, sparsity=[torch.tensor(rates), None])
    attn = run(model, batch, output_attentions=True).attentions[0]
    for head, rate in enumerate(rates):
        assert_zero_counts_follow_rate([attn[:, head : head + 1]], batch["attention_mask"], rate, causal=False)


def test_patching_again_updates_instead_of_stacking(batch):
    model = tiny_model(transformers.GPT2LMHeadModel)
    hf_sparse_attn.patch_model(model, sparsity=0.9)
    hf_sparse_attn.patch_model(model, sparsity=0.25)
    assert [getattr(m, RATE_ATTR) for m in self_attention_modules(model)] == [0.25, 0.25]
    assert hf_sparse_attn.get_patch_config(model).sparsity == 0.25
    fresh = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.25)
    torch.testing.assert_close(run(model, batch).logits, run(fresh, batch).logits)


@pytest.mark.parametrize("model_class", [transformers.BertForSequenceClassification, transformers.GPT2LMHeadModel])
def test_unpatch_restores_the_original_exactly(model_class, batch):
    model = tiny_model(model_class)
    implementation = model.config._attn_implementation
    expected = main_output(run(model, batch))
    hf_sparse_attn.patch_model(model, sparsity=0.5)
    assert not torch.allclose(main_output(run(model, batch)), expected)
    hf_sparse_attn.unpatch_model(model)
    assert model.config._attn_implementation == implementation
    assert hf_sparse_attn.get_patch_config(model) is None
    assert all(not hasattr(m, RATE_ATTR) for m in self_attention_modules(model))
    torch.testing.assert_close(main_output(run(model, batch)), expected, atol=0, rtol=0)


def test_other_models_are_untouched(batch):
    """Two models built from ONE config object (as a loop over seeds does): patching one leaves the other as it
    was. tests/test_loading.py checks the same for saving, set_sparsity and unpatching on every architecture."""
    other = tiny_model(transformers.BertModel)
    expected = run(other, batch).last_hidden_state
    patched = hf_sparse_attn.patch_model(transformers.BertModel(other.config).eval(), sparsity=0.5)
    assert other.config._attn_implementation != ATTENTION_NAME
    assert not hasattr(other.config, "hf_sparse_attn")
    assert patched.config._attn_implementation == ATTENTION_NAME
    torch.testing.assert_close(run(other, batch).last_hidden_state, expected, atol=0, rtol=0)


@pytest.mark.parametrize("model_class", [transformers.BertForSequenceClassification, transformers.GPT2LMHeadModel])
def test_save_and_from_pretrained_round_trip(model_class, batch, tmp_path):
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=[0.3, [0.1, 0.2, 0.3, 0.4]])
    model.save_pretrained(tmp_path)
    again = hf_sparse_attn.from_pretrained(tmp_path)
    assert type(again) is model_class
    assert hf_sparse_attn.get_patch_config(again) == hf_sparse_attn.get_patch_config(model)
    assert again.config._attn_implementation == ATTENTION_NAME
    torch.testing.assert_close(main_output(run(again.eval(), batch)), main_output(run(model, batch)), atol=0, rtol=0)


def test_unpatched_checkpoint_loads_plain(tmp_path):
    tiny_model(transformers.BertModel).save_pretrained(tmp_path)
    model = hf_sparse_attn.from_pretrained(tmp_path)
    assert hf_sparse_attn.get_patch_config(model) is None


def test_generate_with_kv_cache_matches_full_recomputation():
    """Under a KV cache the query is shorter than the keys; the causal mask must still line up."""
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5)
    prompt = padded_batch(batch_size=1, length=5)["input_ids"]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(8):  # greedy without cache: recompute the whole prefix each step
        with torch.no_grad():
            next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("sparsity", [None, 0.5], ids=["softmax", "r0.5"])
def test_attention_dropout_applies_in_training_only(batch, sparsity):
    """Hidden dropout is off, so only attention dropout can make training outputs random (control: p = 0)."""
    outputs = {}
    for p in (0.0, 0.5):
        model = tiny_model(transformers.BertModel, attention_probs_dropout_prob=p, hidden_dropout_prob=0.0)
        hf_sparse_attn.patch_model(model, sparsity=sparsity)
        eval_out = run(model, batch).last_hidden_state
        model.train()
        outputs[p] = [eval_out]
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs[p].append(run(model, batch).last_hidden_state)
    assert all(torch.equal(out, outputs[0.0][0]) for out in outputs[0.0])  # no attention dropout: deterministic
    assert torch.equal(outputs[0.5][0], outputs[0.0][0])  # same weights: eval mode ignores attention dropout
    assert not torch.allclose(outputs[0.5][1], outputs[0.5][0]) and not torch.allclose(*outputs[0.5][1:])


def test_gradients_flow_through_patched_attention(batch):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertForSequenceClassification), sparsity=0.5)
    model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()
    query = self_attention_modules(model)[0].query.weight
    assert query.grad is not None and query.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: hf_sparse_attn.patch_model(nn.Linear(2, 2), sparsity=0.5), TypeError, "transformers PreTrainedModel"),
        (
            lambda: hf_sparse_attn.patch_model(
                transformers.DistilBertModel(
                    transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37)
                ),
                sparsity=0.5,
            ),
            ValueError,
            "supported model types: " + ", ".join(sorted(ARCHITECTURES)),
        ),
        (lambda: hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=1.2), ValueError, r"\[0, 1\]"),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=[0.1] * 3),
            ValueError,
            "2 layers, got 3",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity={7: 0.1}),
            ValueError,
            "layer index 7 does not exist",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=[[0.1, 0.2], None]),
            ValueError,
            "one value per attention head",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.BertForSequenceClassification), head="moss"),
            ValueError,
            "needs a model with an LM head",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), head="top-k"),
            ValueError,
            "head must be None or one of",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), mixtures=3),
            TypeError,
            "unexpected option",
        ),
        (lambda: hf_sparse_attn.set_sparsity(tiny_model(transformers.BertModel), 0.5), ValueError, "not patched"),
    ],
    ids=[
        "not-a-model",
        "unsupported",
        "rate-range",
        "list-length",
        "layer-index",
        "per-head-length",
        "head-on-classifier",
        "unknown-head",
        "unknown-option",
        "set-unpatched",
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_set_sparsity_changes_rates_and_config(batch):
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=0.0)
    hf_sparse_attn.set_sparsity(model, [0.5, None])
    assert hf_sparse_attn.get_patch_config(model).sparsity == [0.5, None]
    assert [getattr(m, RATE_ATTR) for m in self_attention_modules(model)] == [0.5, None]


class TestPretrainedMiniLM:
    """The real all-MiniLM-L6-v2 weights (6 layers, 384 hidden, 12 heads)."""

    @pytest.fixture(scope="class")
    def loaded(self, minilm_path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
        model = transformers.AutoModel.from_pretrained(minilm_path).eval()
        sentences = [
            "Sparse attention keeps only the keys that matter.",
            "A short one.",
            "Padding must be ignored here.",
        ]
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        return model, dict(batch)

    def test_sparsity_none_reproduces_pretrained_outputs(self, loaded):
        model, batch = loaded
        expected = run(model, batch).last_hidden_state
        hf_sparse_attn.patch_model(model, sparsity=None)
        try:
            assert torch.equal(run(model, batch).last_hidden_state, expected)  # bit-identical: the same SDPA call
        finally:
            hf_sparse_attn.unpatch_model(model)

    def test_half_of_valid_keys_are_zero_in_every_layer(self, loaded):
        model, batch = loaded
        hf_sparse_attn.patch_model(model, sparsity=0.5)
        try:
            outputs = run(model, batch, output_attentions=True)
            assert len(outputs.attentions) == 6
            assert_zero_counts_follow_rate(outputs.attentions, batch["attention_mask"], 0.5, causal=False)
        finally:
            hf_sparse_attn.unpatch_model(model)
