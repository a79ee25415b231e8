"""PEFT LoRA on patched models: targets, the new head's ``extra`` trained and saved, gradients reach every trainable
parameter, and an adapter reloads onto a freshly patched base with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model
from huggingface_hub import HfApi
from peft import PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import safe_open

import hf_sparse_attn
from hf_sparse_attn.architectures import ARCHITECTURES
from hf_sparse_attn.patch import PATCH_FILE
from hf_sparse_attn.training.lora import default_lora_targets, lora_config

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
    train_three_steps(model, name)
    batch = inputs(name)
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


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_default_targets_are_peft_own_row(model_type):
    model_class = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel, "gpt2": transformers.GPT2Model}
    model = tiny_model(model_class[model_type])
    assert default_lora_targets(model) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]


def test_peft_row_wins_over_the_architecture_table(monkeypatch):
    """PEFT's row is used as it stands (here changed to ``key``), not our table's ``query``/``value``."""
    monkeypatch.setitem(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "bert", ["key"])
    model = patched("bert-mlm-plif")
    assert default_lora_targets(model) == ["key"]
    wrapped = get_peft_model(model, lora_config(model, r=2))
    lora = {n.split(".lora_")[0].rpartition(".")[2] for n, _ in wrapped.named_parameters() if ".lora_" in n}
    assert lora == {"key"}


def test_architecture_table_is_the_fallback_without_a_peft_row(monkeypatch):
    monkeypatch.delitem(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "gpt2")
    model = patched("gpt2-plif")
    config = lora_config(model, r=2)
    assert sorted(config.target_modules) == list(ARCHITECTURES["gpt2"].lora_targets)
    assert config.fan_in_fan_out  # still detected on the fallback's Conv1D targets


def test_default_targets_reject_unsupported_model():
    model = transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=37))
    with pytest.raises(ValueError, match="supported model types: bert, gpt2, roberta"):
        default_lora_targets(model)


def lora_trained(name: str, base):
    """``base`` patched as ``CASES[name]`` says, wrapped with LoRA and trained for 3 steps."""
    model = hf_sparse_attn.patch_model(base, **CASES[name][1])
    model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    return train_three_steps(model, name)


def train_three_steps(model, name: str):
    """Three Adam steps (lr 1e-2) of ``model``'s trainable parameters on ``inputs(name)``; returns ``model``."""
    model.train()
    batch = inputs(name)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model


def trained_adapter(name: str, base_dir, adapter_dir, *, base_patched: bool = False, write_patch: bool = True):
    """Save a tiny pretrained base (plain, or already patched) in ``base_dir``, load it from there as a user would,
    patch it, train LoRA for 3 steps and save the adapter in ``adapter_dir``. Returns the model in eval mode."""
    model_class, options, _, _ = CASES[name]
    base = tiny_model(model_class, seed=0)
    if base_patched:
        hf_sparse_attn.patch_model(base, **options)
    base.save_pretrained(base_dir)
    model = lora_trained(name, hf_sparse_attn.from_pretrained(base_dir))
    model.save_pretrained(adapter_dir)
    if write_patch:
        assert hf_sparse_attn.save_adapter_patch(model, adapter_dir) == str(adapter_dir / PATCH_FILE)
    return model.eval()


@pytest.mark.parametrize("name", list(CASES))
def test_from_pretrained_of_adapter_folder_returns_patched_peft_model(tmp_path, name):
    model = trained_adapter(name, tmp_path / "base", tmp_path / "adapter")
    batch = inputs(name)
    with torch.no_grad():
        expected = model(**batch).logits
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "base")
    assert not (tmp_path / "base" / PATCH_FILE).exists()  # the base is a plain checkpoint

    again = hf_sparse_attn.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(again, PeftModel) and type(again) is type(model)
    assert type(again.get_base_model()) is type(model.get_base_model())
    assert hf_sparse_attn.get_patch_config(again) == hf_sparse_attn.get_patch_config(model)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in again.parameters())  # PEFT's default: loaded for inference
    trainable = hf_sparse_attn.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert any(".lora_" in n for n, p in trainable.named_parameters() if p.requires_grad)


def test_from_pretrained_of_adapter_on_patched_checkpoint_needs_no_patch_file(tmp_path):
    """A base that is itself a patched checkpoint carries its patch in config.json."""
    model = trained_adapter("gpt2-moss", tmp_path / "base", tmp_path / "adapter", base_patched=True, write_patch=False)
    batch = inputs("gpt2-moss")
    assert not (tmp_path / "adapter" / PATCH_FILE).exists()
    again = hf_sparse_attn.from_pretrained(tmp_path / "adapter").eval()
    assert hf_sparse_attn.get_patch_config(again).head == "moss"
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS upload
def test_from_pretrained_of_adapter_on_the_hub(fake_hub, tmp_path):
    """Base and adapter as Hub repos (the loopback Hub of tests/hub_server.py), the patch file uploaded beside the
    adapter: one call brings back the patched PEFT model."""
    tiny_model(transformers.GPT2LMHeadModel).push_to_hub("me/tiny-gpt2")
    model = lora_trained("gpt2-mos", transformers.GPT2LMHeadModel.from_pretrained("me/tiny-gpt2")).eval()
    repo_id = "me/tiny-gpt2-mos-lora"
    model.push_to_hub(repo_id)
    patch_file = hf_sparse_attn.save_adapter_patch(model, tmp_path)
    HfApi().upload_file(path_or_fileobj=patch_file, path_in_repo=PATCH_FILE, repo_id=repo_id)
    assert {"adapter_config.json", "adapter_model.safetensors", PATCH_FILE} <= set(fake_hub.files(repo_id))

    again = hf_sparse_attn.from_pretrained(repo_id).eval()
    assert hf_sparse_attn.get_patch_config(again) == hf_sparse_attn.get_patch_config(model)
    batch = inputs("gpt2-mos")
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_from_pretrained_of_adapter_without_base_model_is_an_error(tmp_path):
    trained_adapter("gpt2-plif", tmp_path / "base", tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="names no base model"):
        hf_sparse_attn.from_pretrained(tmp_path / "adapter")


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("gpt2-plif", {"task_type": "SEQ_2_SEQ_LM"}, "supported task types: CAUSAL_LM, FEATURE_EXTRACTION"),
        ("bert-mlm-plif", {"auto_mapping": {"base_model_class": "os", "parent_library": "os"}}, "not a transformers"),
    ],
    ids=["seq2seq-task", "foreign-auto-mapping"],
)
def test_from_pretrained_of_adapter_rejects_a_base_class_it_cannot_build(tmp_path, name, change, message):
    trained_adapter(name, tmp_path / "base", tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        hf_sparse_attn.from_pretrained(tmp_path / "adapter")


def test_from_pretrained_of_head_adapter_without_its_patch_is_an_error(tmp_path):
    """PEFT would silently skip ``lm_head.extra`` on an unpatched base: an error instead, naming the fix."""
    trained_adapter("gpt2-mos", tmp_path / "base", tmp_path / "adapter", write_patch=False)
    with pytest.raises(ValueError, match=r"lm_head\.extra.*save_adapter_patch"):
        hf_sparse_attn.from_pretrained(tmp_path / "adapter")


def test_from_pretrained_of_adapter_rejects_output_loading_info(tmp_path):
    trained_adapter("gpt2-plif", tmp_path / "base", tmp_path / "adapter")
    with pytest.raises(TypeError, match="output_loading_info"):
        hf_sparse_attn.from_pretrained(tmp_path / "adapter", output_loading_info=True)


def test_save_adapter_patch_of_unpatched_model_writes_nothing(tmp_path):
    plain = tiny_model(transformers.GPT2LMHeadModel)
    model = get_peft_model(plain, lora_config(plain))
    assert hf_sparse_attn.save_adapter_patch(model, tmp_path) is None
    assert not (tmp_path / PATCH_FILE).exists()


def test_trainer_checkpoints_of_an_adapter_reload_patched(tmp_path):
    """Every ``checkpoint-N`` of a LoRA run carries the patch (AdapterPatchCallback), so a sparsity-only adapter
    reloads with r-softmax, not silently as softmax; without the callback the checkpoint has no patch file."""
    from hf_sparse_attn.training import AdapterPatchCallback

    base = tiny_model(transformers.RobertaForSequenceClassification, seed=0)
    base.save_pretrained(tmp_path / "base")
    model = hf_sparse_attn.patch_model(hf_sparse_attn.from_pretrained(tmp_path / "base"), sparsity=0.5)
    model = get_peft_model(model, lora_config(model))
    batch = inputs("roberta-cls")
    examples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]

    def train(output_dir, callbacks):
        args = transformers.TrainingArguments(
            output_dir=str(output_dir), max_steps=2, save_steps=2, per_device_train_batch_size=3,
            learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        transformers.Trainer(model=model, args=args, train_dataset=examples, callbacks=callbacks).train()
        return output_dir / "checkpoint-2"

    plain = train(tmp_path / "plain", [])
    assert not (plain / PATCH_FILE).exists()  # what a Trainer run without the callback leaves behind

    checkpoint = train(tmp_path / "run", [AdapterPatchCallback()])
    assert json.loads((checkpoint / PATCH_FILE).read_text())["sparsity"] == 0.5
    again = hf_sparse_attn.from_pretrained(checkpoint).eval()
    assert hf_sparse_attn.get_patch_config(again).sparsity == 0.5
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
