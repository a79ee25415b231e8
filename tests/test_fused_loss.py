"""The fused head loss inside patched models: the same loss and gradients as the model's own (unfused) forward
for every head on GPT-2, BERT and RoBERTa MLM, no logits in training, the model's own forward everywhere else, and
training under Trainer, PEFT, gradient checkpointing and DDP."""

from __future__ import annotations

import copy
import doctest
import importlib

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import padded_batch, tiny_model
from peft import get_peft_model
from torch import nn

import hf_sparse_attn
from hf_sparse_attn.fused_loss import disable_fused_loss, enable_fused_loss, fused_loss_enabled, head_nll
from hf_sparse_attn.heads import build_head
from hf_sparse_attn.training.lora import lora_config

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

HEADS = {
    "softmax": {},
    "sigsoftmax": {},
    "plif": {"num_knots": 50, "knot_range": 5.0},
    "mos": {"num_mixtures": 3},
    "moss": {"num_mixtures": 2},
}
NO_DROPOUT = {
    "gpt2": dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
MODELS = {
    "gpt2": transformers.GPT2LMHeadModel,
    "bert": transformers.BertForMaskedLM,
    "roberta": transformers.RobertaForMaskedLM,
}


def patched(model_type: str, head: str, seed: int = 0, sparsity=None) -> transformers.PreTrainedModel:
    model = tiny_model(MODELS[model_type], seed=seed, **NO_DROPOUT[model_type])
    hf_sparse_attn.patch_model(model, sparsity=sparsity, head=None if head == "softmax" else head, **HEADS[head])
    if head == "plif":  # move f away from the identity, so that its gradients and the transform both matter
        with torch.no_grad():
            model.get_output_embeddings().extra.theta.normal_(generator=torch.Generator().manual_seed(1))
    return model.train()


def batch_with_labels(model_type: str) -> dict[str, torch.Tensor]:
    batch = padded_batch(batch_size=3, length=12)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if model_type != "gpt2":  # MLM: only some positions carry a label
        labels[:, ::3] = -100
    return {**batch, "labels": labels}


def loss_and_grads(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs):
    out = model(**batch, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


def assert_same_training_step(model: nn.Module, batch: dict[str, torch.Tensor], **kwargs) -> None:
    """The fused loss and gradients equal the model's own forward (fused path disabled) in float32."""
    assert fused_loss_enabled(model)
    fused, fused_grads = loss_and_grads(model, batch, **kwargs)
    assert fused.logits is None
    disable_fused_loss(model)
    try:
        plain, plain_grads = loss_and_grads(model, batch, **kwargs)
    finally:
        enable_fused_loss(model)
    assert plain.logits is not None
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(fused.loss, plain.loss, rtol=16 * eps, atol=0)
    # Gradients are float32 sums over tokens x vocabulary in a different order; some (the mixture prior's at its
    # uniform start) are themselves cancellations, so the absolute error is measured against the largest gradient.
    scale = max(g.abs().max().item() for g in plain_grads)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("model_type", list(MODELS))
def test_loss_and_gradients_equal_the_unfused_model(model_type, head):
    model = patched(model_type, head, sparsity=0.3)
    assert_same_training_step(model, batch_with_labels(model_type))


def test_trainer_counts_tokens_like_the_unfused_loss():
    # Trainer passes num_items_in_batch: the loss is then sum / num_items_in_batch (here a deliberately odd count)
    model = patched("gpt2", "moss")
    assert_same_training_step(model, batch_with_labels("gpt2"), num_items_in_batch=torch.tensor(7))


def test_shift_labels_and_ignore_index_are_honoured():
    model = patched("gpt2", "sigsoftmax")
    batch = batch_with_labels("gpt2")
    shift = batch["labels"].roll(-1, dims=1)
    assert_same_training_step(model, batch, shift_labels=shift)
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, 5)
    assert_same_training_step(model, batch, ignore_index=5)


def test_positional_input_and_tuple_output():
    model = patched("gpt2", "plif")
    batch = batch_with_labels("gpt2")
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], return_dict=False)
    disable_fused_loss(model)
    plain = model(**batch)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], plain.loss)
    assert not any(isinstance(x, torch.Tensor) and x.shape[-1:] == (99,) for x in out)  # no logits in the tuple


@pytest.mark.parametrize("model_type", list(MODELS))
def test_other_calls_are_the_models_own_forward(model_type):
    model = patched(model_type, "mos")
    batch = batch_with_labels(model_type)
    model.eval()  # evaluation (Trainer's prediction_step): logits and loss as before
    out = model(**batch)
    assert out.logits.shape == (3, 12, 99)
    assert torch.allclose(out.logits.logsumexp(-1), torch.zeros(3, 12), atol=1e-5)
    model.train()
    with torch.no_grad():  # no autograd: nothing to fuse
        assert model(**batch).logits is not None
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits is not None  # no labels
    if model_type == "gpt2":  # logits of the last position only, with labels: transformers' own error, as unpatched
        with pytest.raises(ValueError, match="to match target batch_size"):
            model(**batch, logits_to_keep=1)


def test_generate_is_unchanged():
    model = patched("gpt2", "moss", seed=3).eval()
    prompt = padded_batch(batch_size=1, length=5)["input_ids"]
    fused = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    disable_fused_loss(model)
    assert torch.equal(fused, model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2))


def test_patch_and_unpatch_install_and_remove_it_on_the_instance_only():
    model = patched("bert", "softmax")
    other = tiny_model(transformers.BertForMaskedLM)
    assert fused_loss_enabled(model) and not fused_loss_enabled(other)
    assert "forward" not in vars(other) and type(model).forward is transformers.BertForMaskedLM.forward
    hf_sparse_attn.unpatch_model(model)
    assert not fused_loss_enabled(model) and "forward" not in vars(model)
    classifier = hf_sparse_attn.patch_model(tiny_model(transformers.BertForSequenceClassification), sparsity=0.5)
    assert not fused_loss_enabled(classifier)  # no LM head: nothing to fuse


def test_a_deep_copy_fuses_its_own_loss():
    model = patched("gpt2", "plif")
    clone = copy.deepcopy(model)
    assert fused_loss_enabled(clone) and clone.forward.__self__ is clone
    with torch.no_grad():
        clone.get_output_embeddings().extra.theta.zero_()  # only the copy changes
    batch = batch_with_labels("gpt2")
    assert clone(**batch).loss.item() != pytest.approx(model(**batch).loss.item())


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's warnings about LoRA on a tied nn.Linear
def test_lora_on_the_output_layer_falls_back_to_the_unfused_loss():
    # PEFT LoRA *on* the vocabulary layer changes what the layer computes: the model's own forward runs instead
    model = patched("gpt2", "softmax")
    peft = get_peft_model(model, lora_config(model, r=2, alpha=4, target_modules=["c_attn", "lm_head"]))
    out = peft(**batch_with_labels("gpt2"))
    assert out.logits is not None


@pytest.mark.parametrize("head", ["plif", "moss"])
def test_peft_lora_trains_through_the_fused_path(head):
    model = patched("gpt2", head)
    peft = get_peft_model(model, lora_config(model, r=4, alpha=8))
    peft.train()
    assert_same_training_step(model, batch_with_labels("gpt2"))  # the wrapped model's parameters
    out = peft(**batch_with_labels("gpt2"))
    assert out.logits is None
    out.loss.backward()
    trainable = {n: p for n, p in peft.named_parameters() if p.requires_grad}
    assert any("lm_head.extra" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    # lora_A's gradient is 0 while lora_B starts at 0; the head's own parameters and lora_B get nonzero gradients
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_A" not in n)


def test_gradient_checkpointing():
    model = patched("gpt2", "sigsoftmax")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_same_training_step(model, batch_with_labels("gpt2"))


def test_ddp_wrapped_model_uses_the_fused_loss(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = patched("roberta", "plif")
        ddp = nn.parallel.DistributedDataParallel(model)
        out = ddp(**batch_with_labels("roberta"))
        assert out.logits is None
        out.loss.backward()
        fused_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        disable_fused_loss(model)
        ddp(**batch_with_labels("roberta")).loss.backward()
        for got, p in zip(fused_grads, model.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, size: int = 24, length: int = 12) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 99, (size, length), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def trainer_losses(output_dir, head: str, fused: bool) -> list[float]:
    model = patched("gpt2", head)
    model.loss_type = "ForCausalLM"  # transformers 5.23: count the shifted labels (docs/transformers-notes.md)
    if not fused:
        disable_fused_loss(model)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.logits is None) if module.training else None)
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, lr_scheduler_type="constant",
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    trainer.train()
    assert seen == [fused] * 3  # the fused path ran at every training step (and only then)
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("head", list(HEADS))
def test_trainer_trains_through_the_fused_path_with_the_unfused_losses(tmp_path, head):
    fused = trainer_losses(tmp_path / "fused", head, fused=True)
    plain = trainer_losses(tmp_path / "plain", head, fused=False)
    assert len(fused) == 3 and fused[-1] < fused[0]
    assert fused == pytest.approx(plain, rel=1e-5)  # float32 summation order over 3 Adam steps


def test_head_nll_of_every_head_matches_cross_entropy():
    for name, options in HEADS.items():
        head = build_head(name, nn.Linear(8, 11), **options)
        hidden = torch.randn(6, 8)
        labels = torch.tensor([1, -100, 3, 4, 0, 10])
        torch.testing.assert_close(head_nll(head, hidden, labels), F.cross_entropy(head(hidden), labels))
    with pytest.raises(TypeError, match="head must be an nn.Linear"):
        head_nll(nn.Identity(), hidden, labels)


def test_doctests():
    module = importlib.import_module("hf_sparse_attn.fused_loss")
    globs = {"torch": torch, "nn": nn, "F": F, "build_head": build_head}
    result = doctest.testmod(module, extraglobs=globs)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("head", [None, "moss"])
def test_torch_compile_fullgraph_of_a_patched_causal_lm(head):
    """The instance forward that routes the fused loss is a plain function under the class signature, so dynamo can
    trace a patched GPT-2 LM in one graph (a ``functools.partial`` there made ``torch.compile`` fail outright)."""
    model = hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5, head=head)
    assert fused_loss_enabled(model)
    ids = padded_batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, expected)
