"""Every mask format transformers hands the attention function, on tiny BERT, RoBERTa and GPT-2 (issue 10, items 1
and 12): ``sparsity=None`` is bit-identical to the unpatched SDPA model, r-softmax layers honour the same masks, and
KV-cache steps (dynamic and static caches) line up."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model

import hf_sparse_attn
from hf_sparse_attn.architectures import self_attention_modules

MODEL_CLASSES = [transformers.BertModel, transformers.RobertaModel, transformers.GPT2Model]
LENGTH = 12
#: additive values that block a key, from the finite conventions (-1e4 of older BERT code, -1e9) to finfo.min / -inf
BLOCKED = {"-1e4": -1e4, "-1e9": -1e9, "finfo-min": torch.finfo(torch.float32).min, "-inf": float("-inf")}


def run(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def document_mask(causal: bool, blocked: float | None) -> torch.Tensor:
    """A 4-D ``[B, 1, T, T]`` mask of two packed documents (tokens 0-6 and 7-11), causal inside each for GPT-2;
    bool (True = attend) when ``blocked`` is None, else additive with 0 and ``blocked``."""
    doc = torch.arange(LENGTH) >= 7
    allowed = doc[:, None] == doc[None, :]  # (T, T)
    if causal:
        allowed &= torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    allowed = allowed.expand(3, 1, LENGTH, LENGTH)  # (B, 1, T, T)
    if blocked is None:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, blocked)


def mask_inputs(kind: str, causal: bool) -> dict[str, torch.Tensor]:
    batch = padded_batch(length=LENGTH)
    if kind == "2d-padding":
        return batch
    if kind == "no-mask":
        return {"input_ids": batch["input_ids"]}
    blocked = None if kind == "4d-bool" else BLOCKED[kind.removeprefix("4d-")]
    return {"input_ids": batch["input_ids"], "attention_mask": document_mask(causal, blocked)}


MASK_KINDS = ["2d-padding", "no-mask", "4d-bool", *(f"4d-{name}" for name in BLOCKED)]


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_sparsity_none_is_bit_identical_to_the_sdpa_model(model_class, kind):
    model = tiny_model(model_class)
    assert model.config._attn_implementation == "sdpa"
    inputs = mask_inputs(kind, causal=model.config.model_type == "gpt2")
    expected = run(model, **inputs)
    hf_sparse_attn.patch_model(model, sparsity=None)
    assert torch.equal(run(model, **inputs), expected)


@pytest.mark.parametrize("kind", ["2d-padding", "4d-finfo-min", "4d--1e4", "4d--inf"])
@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_sparsity_none_matches_the_eager_model(model_class, kind):
    """An unpatched eager model adds the same masks; the two differ only by float rounding (fp32 defaults).
    (Not a 4-D bool mask: eager attention adds it to the scores as 0 / 1.)"""
    model = tiny_model(model_class, attn_implementation="eager")
    inputs = mask_inputs(kind, causal=model.config.model_type == "gpt2")
    expected = run(model, **inputs)
    hf_sparse_attn.patch_model(model, sparsity=None)
    torch.testing.assert_close(run(model, **inputs), expected)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_masked_values_agree_with_the_boolean_mask_under_r_softmax(model_class):
    """finfo.min and -inf mark masked keys (out of the quantile): exactly the boolean mask's result. Finite
    -1e4 / -1e9 are added to the scores like any bias, so their keys count towards the rate: a different result."""
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5)
    causal = model.config.model_type == "gpt2"
    expected = run(model, **mask_inputs("4d-bool", causal))
    for name in ("finfo-min", "-inf"):
        assert torch.equal(run(model, **mask_inputs(f"4d-{name}", causal)), expected), name
    for name in ("-1e4", "-1e9"):
        assert not torch.allclose(run(model, **mask_inputs(f"4d-{name}", causal)), expected), name


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_r_softmax_adds_a_finite_negative_document_mask(model_class):
    """Issue 10 item 1 with a rate: main turned a -1e4 block mask into "attend" and never added it, so the other
    document leaked in. Here the blocked keys get weight 0 (as under softmax) while counting towards the rate."""
    model = hf_sparse_attn.patch_model(tiny_model(model_class), sparsity=0.5)
    inputs = mask_inputs("4d--1e4", causal=model.config.model_type == "gpt2")
    allowed = document_mask(model.config.model_type == "gpt2", None)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    for layer in attentions:
        assert torch.all(layer.masked_select(~allowed) == 0)
        torch.testing.assert_close(layer.sum(-1), torch.ones(layer.shape[:-1]))


@pytest.mark.parametrize("sparsity", [None, 0.5], ids=["softmax", "r0.5"])
def test_kv_cache_steps_match_the_unpatched_and_the_full_computation(sparsity):
    """Prefill then one-token steps through a DynamicCache, with left padding: sparsity=None is bit-identical to the
    unpatched SDPA model step by step; any rate gives the logits of recomputing the whole prefix."""
    model = tiny_model(transformers.GPT2LMHeadModel)
    reference = tiny_model(transformers.GPT2LMHeadModel)
    hf_sparse_attn.patch_model(model, sparsity=sparsity)
    batch = padded_batch(batch_size=2, length=6)
    ids, mask = batch["input_ids"], batch["attention_mask"].flip(-1)  # left padding, as for generation
    steps = torch.randint(3, 99, (2, 3), generator=torch.Generator().manual_seed(0))

    def decode(m):
        logits, attention = [], mask
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=attention, use_cache=True)
            logits.append(out.logits[:, -1])
            for i in range(steps.shape[1]):
                attention = torch.cat([attention, torch.ones(2, 1, dtype=attention.dtype)], dim=1)
                out = m(input_ids=steps[:, i : i + 1], attention_mask=attention, past_key_values=out.past_key_values)
                logits.append(out.logits[:, -1])
        return torch.stack(logits), attention

    logits, full_mask = decode(model)
    if sparsity is None:
        assert torch.equal(logits, decode(reference)[0])
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, steps], dim=1), attention_mask=full_mask, use_cache=False).logits
    torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 :].transpose(0, 1))


def test_static_cache_prefill_ignores_the_empty_cache_slots():
    """A static-cache prefill hands over no mask (transformers relies on SDPA's top-left is_causal) and keys longer
    than the queries: the empty slots must not be attended, so static and dynamic caches give the same logits."""
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5)
    prompt = padded_batch(batch_size=1, length=5)["input_ids"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    dynamic = model.generate(prompt, **kwargs)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits))


@pytest.mark.parametrize("model_class", [transformers.BertLMHeadModel, transformers.GPT2LMHeadModel])
def test_cross_attention_stays_softmax(model_class):
    """Only self-attention is patched: cross-attention layers keep SDPA softmax (no zeros at valid keys)."""
    options = {"is_decoder": True} if model_class is transformers.BertLMHeadModel else {}
    model = tiny_model(model_class, add_cross_attention=True, **options)
    inputs = {
        "input_ids": padded_batch(length=8)["input_ids"],
        "encoder_hidden_states": torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)),
    }
    with torch.no_grad():
        expected = model(**inputs).logits
        hf_sparse_attn.patch_model(model, sparsity=None)
        assert torch.equal(model(**inputs).logits, expected)
        hf_sparse_attn.patch_model(model, sparsity=0.5)
        out = model(**inputs, output_attentions=True)
    assert all((layer == 0).any() for layer in out.attentions)  # self-attention: r-softmax zeros
    assert all((layer > 0).all() for layer in out.cross_attentions)  # cross-attention: softmax, dense
    assert len(self_attention_modules(model)) == len(out.cross_attentions)


def test_output_attentions_keeps_one_entry_per_layer_with_softmax_layers():
    """GPT-2 does not pass output_attentions to the function; the rate-None layer must still report its weights,
    or the tuple would shift layers silently."""
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2Model), sparsity=[None, 0.5])
    batch = padded_batch(length=LENGTH)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    assert len(out.attentions) == 2
    valid = batch["attention_mask"].bool()[:, None, None, :] & torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    softmax_layer, sparse_layer = out.attentions
    assert torch.all(softmax_layer.masked_select(valid) > 0) and torch.all(softmax_layer.masked_select(~valid) == 0)
    assert (sparse_layer.masked_select(valid) == 0).float().mean() > 0.3


def test_output_attentions_config_flag_raises_but_the_call_argument_works():
    """transformers 5.23 refuses ``config.output_attentions = True`` for every implementation but eager (SDPA too);
    ``model(..., output_attentions=True)`` returns one ``[B, H, T, T]`` tensor per layer."""
    model = hf_sparse_attn.patch_model(tiny_model(transformers.BertModel), sparsity=0.5)
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True
    with torch.no_grad():
        attentions = model(**padded_batch(length=LENGTH), output_attentions=True).attentions
    assert [a.shape for a in attentions] == [(3, 4, LENGTH, LENGTH)] * 2
