"""PEFT LoRA on patched models: targets, the new head's ``extra`` trained and saved, gradients reach every trainable
parameter, and an adapter reloads onto a freshly patched base with identical outputs."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import hf_sparse_attn
from hf_sparse_attn.lora import lora_config

# peft 0.21 calls transformers' deprecated `is_gradient_checkpointing`; the FutureWarning is PEFT's, not ours
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

#: (model class, patch options, module names LoRA must wrap, modules trained in full)
CASES = {
    "gpt2-sigsoftmax": (transformers.GPT2LMHeadModel, dict(sparsity=0.5, head="sigsoftmax"), ["c_attn"], []),
    "gpt2-mos": (transformers.GPT2LMHeadModel, dict(sparsity=0.5, head="mos", num_mixtures=3), ["c_attn"],
                 ["lm_head.extra"]),
    "gpt2-moss": (transformers.GPT2LMHeadModel, dict(sparsity=[None, 0.3], head="moss"), ["c_attn"],
                  ["lm_head.extra"]),
    "gpt2-plif": (transformers.GPT2LMHeadModel, dict(sparsity=0.5, head="plif", num_knots=50), ["c_attn"],
                  ["lm_head.extra"]),
    "bert-mlm-plif": (transformers.BertForMaskedLM, dict(sparsity=0.5, head="plif", num_knots=50),
                      ["query", "value"], ["cls.predictions.decoder.extra"]),
    "roberta-mlm-moss": (transformers.RobertaForMaskedLM, dict(sparsity=0.5, head="moss"), ["query", "value"],
                         ["lm_head.decoder.extra"]),
    "roberta-cls": (transformers.RobertaForSequenceClassification, dict(sparsity=0.5), ["query", "value"],
                    ["classifier"]),
    "gpt2-cls": (transformers.GPT2ForSequenceClassification, dict(sparsity=0.5), ["c_attn"], ["score"]),
}  # fmt: skip


def patched(name: str, seed: int = 0):
    model_class, options, _, _ = CASES[name]
    return hf_sparse_attn.patch_model(tiny_model(model_class, seed=seed), **options)


def inputs(name: str) -> dict[str, torch.Tensor]:
    batch = padded_batch(batch_size=3, length=10)
    model_class = CASES[name][0]
    if model_class.__name__.endswith("SequenceClassification"):
        batch["labels"] = torch.tensor([0, 1, 1])
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def peft_model(name: str, seed: int = 0):
    model = patched(name, seed)
    config = lora_config(model, r=4, alpha=8)
    return get_peft_model(model, config), config


@pytest.mark.parametrize("name", list(CASES))
def test_lora_config_targets_and_trains_the_new_head(name):
    _, _, targets, full = CASES[name]
    model, config = peft_model(name)
    assert sorted(config.target_modules) == sorted(targets)
    assert config.fan_in_fan_out == (targets == ["c_attn"])  # GPT-2's Conv1D stores the weight transposed
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(any(f".{t}.lora_" in n for t in targets) for n in lora)
    others = [n for n in trainable if ".lora_" not in n]
    for module in full:  # trained in full through PEFT's modules_to_save copy
        assert any(f"{module}.modules_to_save.default." in n for n in others), (module, others)
    assert all(any(f"{m}.modules_to_save" in n for m in full) for n in others), others
    # the vocabulary-sized output weight stays frozen (and tied to the input embedding)
    embedding = model.get_base_model().get_input_embeddings().weight
    assert not embedding.requires_grad


@pytest.mark.parametrize("name", list(CASES))
def test_every_trainable_parameter_gets_a_gradient(name):
    """LoRA's B starts at 0, so A has no gradient at step 0 by design; after one update every trainable parameter
    -- LoRA A and B, the head's extra, the classifier -- must receive a nonzero gradient. A head that read its
    extra parameters without calling the ``extra`` module would leave PEFT's trained copy without one."""
    model, _ = peft_model(name)
    model.train()
    batch = inputs(name)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing


@pytest.mark.parametrize("name", list(CASES))
def test_adapter_reloads_on_freshly_patched_base(tmp_path, name):
    model, _ = peft_model(name)
    model.train()
    batch = inputs(name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert all(".lora_" in k or any(m in k for m in CASES[name][3]) for k in shapes), sorted(shapes)
    vocab = model.get_base_model().config.vocab_size
    assert not any(vocab in shape for shape in shapes.values())  # no copy of the [V, D] output embedding

    # the same pretrained weights, freshly patched: its head extras / classifier are the untrained ones
    base = patched(name, seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(base(**batch).logits, expected)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        actual = reloaded(**batch).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_lora_config_validates_rank():
    with pytest.raises(ValueError, match="r must be"):
        lora_config(patched("gpt2-plif"), r=0)


def test_lora_config_rejects_peft_wrapped_model():
    model, _ = peft_model("gpt2-plif")
    with pytest.raises(TypeError, match="PEFT"):
        lora_config(model)
