"""The LM heads end to end on tiny GPT-2, BERT and RoBERTa models: log-probabilities, transformers' losses,
generate() and pipelines, tied weights, save/load, step-0 behaviour, memory, and bad input."""

from __future__ import annotations

import collections
import doctest
import functools
import gzip
import importlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import padded_batch, tiny_model, word_tokenizer
from safetensors import safe_open
from torch import nn
from torch.profiler import ProfilerActivity, profile

import hf_sparse_attn
from hf_sparse_attn.heads import MixtureHead, MonotonicHead, SigSoftmaxHead, build_head, restore_linear

#: head name -> options given to patch_model
HEADS = {
    "sigsoftmax": {},
    "mos": {"num_mixtures": 3},
    "moss": {"num_mixtures": 2},
    "plif": {"num_knots": 100, "knot_range": 10.0},
}
MODELS = {
    "gpt2": transformers.GPT2LMHeadModel,
    "bert": transformers.BertForMaskedLM,
    "roberta": transformers.RobertaForMaskedLM,
}
VOCAB = 99


def patched(model_type: str, head: str, seed: int = 0) -> transformers.PreTrainedModel:
    return hf_sparse_attn.patch_model(tiny_model(MODELS[model_type], seed=seed), head=head, **HEADS[head])


def labelled_batch(model_type: str) -> dict[str, torch.Tensor]:
    """Padded batch with labels: every valid token for GPT-2, a random third of the valid tokens for MLM."""
    batch = padded_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if model_type != "gpt2":
        keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) < 1 / 3
        keep[0, 0] = True
        labels = labels.masked_fill(~keep, -100)
    return {**batch, "labels": labels}


def nll_by_hand(log_probs: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:  # position t predicts token t + 1
        log_probs, labels = log_probs[:, :-1], labels[:, 1:]
    return F.nll_loss(log_probs.reshape(-1, log_probs.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Mean over positions of KL(p || q)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def head_of(model: nn.Module) -> nn.Linear:
    return model.get_output_embeddings()


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and transformers' own losses


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", MODELS)
def test_returns_log_probs_and_loss_is_their_nll(model_type, head):
    model = patched(model_type, head)
    batch = labelled_batch(model_type)
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, VOCAB) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(batch["input_ids"].shape), atol=1e-5, rtol=0)
    expected = nll_by_hand(out.logits, batch["labels"], causal=model_type == "gpt2")
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", MODELS)
def test_every_new_parameter_gets_a_gradient(model_type, head):
    model = patched(model_type, head).train()
    model(**labelled_batch(model_type)).loss.backward()
    lm_head = head_of(model)
    new = dict(lm_head.extra.named_parameters()) if hasattr(lm_head, "extra") else {}
    assert len(new) == {"sigsoftmax": 0, "mos": 2, "moss": 2, "plif": 1}[head]
    for name, param in [*new.items(), ("weight", lm_head.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head", HEADS)
def test_bfloat16_model_gives_float32_log_probs_and_gradients(head):
    model = patched("gpt2", head).to(torch.bfloat16).train()
    batch = labelled_batch("gpt2")
    with torch.no_grad():  # log-probs: the model's own forward (a training call with labels fuses the loss)
        out = model(**batch)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(batch["input_ids"].shape), atol=1e-4, rtol=0)
    model(**batch).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or (param.grad.dtype == torch.bfloat16 and torch.isfinite(param.grad).all()), name
    assert all(p.grad is not None for p in getattr(head_of(model), "extra", nn.Module()).parameters())


@pytest.mark.parametrize("head", HEADS)
def test_autocast_bfloat16_training_step(head):
    model = patched("gpt2", head).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**labelled_batch("gpt2"))
    assert out.logits is None  # the fused head loss (hf_sparse_attn.fused_loss): no logits in training
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    for param in [head_of(model).weight, *getattr(head_of(model), "extra", nn.Module()).parameters()]:
        assert param.grad is not None and param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all()


@pytest.mark.parametrize("head", HEADS)
def test_accepts_any_leading_shape(head):
    lm_head = build_head(head, nn.Linear(8, 13), **HEADS[head])
    hidden = torch.randn(2, 5, 8)
    full = lm_head(hidden)
    assert full.shape == (2, 5, 13)
    torch.testing.assert_close(lm_head(hidden[:, -1:]), full[:, -1:])  # generate() passes one position
    torch.testing.assert_close(lm_head(hidden.reshape(10, 8)), full.reshape(10, 13))


# ---------------------------------------------------------------------------------------------------------------
# generate() and pipelines

GENERATE_MODES = {
    "greedy": {"do_sample": False},
    "top-p": {"do_sample": True, "top_p": 0.5, "top_k": 0},
    "beam3": {"do_sample": False, "num_beams": 3},
}


@pytest.mark.parametrize("mode", GENERATE_MODES)
@pytest.mark.parametrize("head", HEADS)
def test_generate(head, mode):
    model = patched("gpt2", head)
    prompt = torch.tensor([[5, 6, 7, 8]])
    torch.manual_seed(0)
    out = model.generate(
        prompt,
        max_new_tokens=5,
        min_new_tokens=5,
        pad_token_id=1,
        return_dict_in_generate=True,
        output_scores=True,
        **GENERATE_MODES[mode],
    )
    assert out.sequences.shape == (1, 9) and torch.equal(out.sequences[:, :4], prompt)
    assert ((out.sequences >= 0) & (out.sequences < VOCAB)).all()
    if mode == "greedy":  # the first new token is the argmax of the head's log-probabilities
        with torch.no_grad():
            assert out.sequences[0, 4] == model(prompt).logits[0, -1].argmax()
    if mode == "beam3":
        assert torch.isfinite(out.sequences_scores).all()
    if mode == "top-p":  # only the nucleus of the head's distribution can be sampled, and it is what is sampled
        for step, scores in enumerate(out.scores):
            with torch.no_grad():
                log_probs = model(out.sequences[:, : 4 + step]).logits[0, -1]
            allowed = scores[0].isfinite().nonzero().flatten().tolist()
            assert sorted(allowed) == nucleus(log_probs, top_p=0.5, banned=1)  # eos is banned by min_new_tokens
            assert out.sequences[0, 4 + step].item() in allowed


def nucleus(log_probs: torch.Tensor, top_p: float, banned: int) -> list[int]:
    """The smallest set of most likely tokens whose probability reaches ``top_p`` (Holtzman et al. 2020), after
    ``banned`` is removed and the rest renormalised: a token is in it if the tokens more likely than it hold less
    than ``top_p`` of the mass."""
    probs = log_probs.double().exp()
    probs[banned] = 0
    probs /= probs.sum()
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    return sorted(order[(mass_before < top_p) & (probs[order] > 0)].tolist())


@pytest.mark.parametrize("head", HEADS)
def test_repetition_penalty_raises_log_probs_to_the_power(head):
    """The penalty multiplies a negative score by θ and divides a positive one; a head's scores are
    log-probabilities (<= 0), so every token already in the sequence gets θ · log p (docs/heads.md)."""
    model = patched("gpt2", head)
    prompt = torch.tensor([[5, 6, 7, 5]])
    penalty = 1.7
    out = model.generate(
        prompt, max_new_tokens=1, do_sample=False, repetition_penalty=penalty, pad_token_id=1,
        return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    with torch.no_grad():
        expected = model(prompt).logits[0, -1].clone()
    assert (expected <= 0).all()
    expected[[5, 6, 7]] *= penalty
    # float32 defaults: generate computes the head on the last position only, a different matmul shape
    torch.testing.assert_close(out.scores[0][0], expected)
    assert out.sequences[0, -1] == expected.argmax()


@pytest.mark.parametrize("head", HEADS)
def test_text_generation_pipeline(head):
    pipe = transformers.pipeline("text-generation", model=patched("gpt2", head), tokenizer=word_tokenizer())
    (result,) = pipe("w5 w6 w7", max_new_tokens=3, min_new_tokens=3, do_sample=False)
    words = result["generated_text"].split()
    assert result["generated_text"].startswith("w5 w6 w7") and len(words) >= 3


# ---------------------------------------------------------------------------------------------------------------
# Tied weights, save / load


def assert_tied(model: transformers.PreTrainedModel, model_type: str) -> None:
    lm_head, embeddings = head_of(model), model.get_input_embeddings()
    assert lm_head.weight is embeddings.weight
    assert lm_head.weight.data_ptr() == embeddings.weight.data_ptr()
    if model_type == "bert":
        assert lm_head.bias is model.cls.predictions.bias
    if model_type == "roberta":
        assert lm_head.bias is model.lm_head.bias


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("model_type", MODELS)
def test_save_load_round_trip_keeps_ties_and_log_probs(model_type, head, tmp_path):
    model = patched(model_type, head)
    assert_tied(model, model_type)
    with torch.no_grad():  # move the new parameters away from their init, so that loading them is visible
        for param in getattr(head_of(model), "extra", nn.Module()).parameters():
            param.add_(torch.randn_like(param) * 0.1)
    batch = padded_batch()
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)

    loaded = hf_sparse_attn.from_pretrained(tmp_path).eval()
    assert type(head_of(loaded)) is type(head_of(model))
    assert_tied(loaded, model_type)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    head_path = next(name for name, module in model.named_modules() if module is head_of(model))
    new_parameters = getattr(head_of(model), "extra", nn.Module()).named_parameters()
    assert {f"{head_path}.extra.{name}" for name, _ in new_parameters} <= keys
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, before, rtol=0, atol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_sparse_attn"]["head"] == head


# ---------------------------------------------------------------------------------------------------------------
# Step 0: PLIF is exactly the base model; mixtures are close to it


@pytest.mark.parametrize("model_type", MODELS)
def test_plif_at_init_is_the_base_model(model_type):
    base = tiny_model(MODELS[model_type])
    batch = labelled_batch(model_type)
    with torch.no_grad():
        expected = base(**batch)
        hf_sparse_attn.patch_model(base, head="plif")  # defaults: 1000 knots over [-20, 20]
        got = base(**batch)
    torch.testing.assert_close(got.logits, expected.logits.log_softmax(-1), atol=1e-5, rtol=1e-5)
    assert torch.equal(got.logits.argmax(-1), expected.logits.argmax(-1))
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["mos", "moss"])
def test_mixture_at_init_is_close_to_the_base_model(head):
    """KL(base || mixture) at step 0 on a GPT-2 whose sharpened output embedding gives confident predictions."""
    base = tiny_model(transformers.GPT2LMHeadModel)
    with torch.no_grad():
        base.transformer.wte.weight.mul_(10)  # std 0.2: a peaked next-token distribution
        log_p = base(**padded_batch()).logits.log_softmax(-1)
        hf_sparse_attn.patch_model(base, head=head, num_mixtures=4)
        log_q = base(**padded_batch()).logits
    kl = kl_divergence(log_p, log_q)
    kl_uniform = kl_divergence(log_p, torch.full_like(log_p, -torch.log(torch.tensor(float(VOCAB)))))
    print(f"{head}: KL(base || head) at step 0 = {kl:.4f} (KL to uniform {kl_uniform:.3f})")
    assert kl < 0.1 * kl_uniform


# ---------------------------------------------------------------------------------------------------------------
# Construction: parameter costs, re-patching, restore, repr


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("sigsoftmax", {}, 0),
        ("mos", {"num_mixtures": 3}, 3 * 16 * 16 + 3 * 16),
        ("moss", {"num_mixtures": 1}, 16 * 16 + 16),
        ("plif", {"num_knots": 7}, 6),
    ],
    ids=["sigsoftmax", "mos-K3", "moss-K1", "plif-K7"],
)
def test_parameter_cost(name, options, expected):
    linear = nn.Linear(16, 50)
    head = build_head(name, linear, **options)
    assert sum(p.numel() for p in head.parameters()) - sum(p.numel() for p in linear.parameters()) == expected
    assert head.weight is linear.weight and head.bias is linear.bias


def test_repatching_replaces_instead_of_stacking():
    linear = nn.Linear(16, 50, bias=False)
    mos = build_head("mos", linear, num_mixtures=2)
    plif = build_head("plif", mos, num_knots=5)
    assert type(plif) is MonotonicHead and plif.weight is linear.weight and plif.bias is None
    assert sum(p.numel() for p in plif.parameters()) == linear.weight.numel() + 4
    plain = build_head("softmax", plif)
    assert type(plain) is nn.Linear and plain.weight is linear.weight
    assert build_head("softmax", linear) is linear


@pytest.mark.parametrize("model_type", MODELS)
def test_patch_switch_and_unpatch_model(model_type):
    model = patched(model_type, "mos")
    hf_sparse_attn.patch_model(model, head="plif", num_knots=10)
    lm_head = head_of(model)
    assert type(lm_head) is MonotonicHead and not any(isinstance(m, MixtureHead) for m in model.modules())
    hf_sparse_attn.unpatch_model(model)
    assert type(head_of(model)) is nn.Linear
    assert_tied(model, model_type)


def test_restore_linear_shares_parameters():
    linear = nn.Linear(16, 50)
    head = SigSoftmaxHead(linear)
    restored = restore_linear(head)
    assert type(restored) is nn.Linear and restored.weight is linear.weight and restored.bias is linear.bias
    x = torch.randn(3, 16)
    torch.testing.assert_close(restored(x), linear(x))
    assert restore_linear(linear) is linear


def test_extra_repr_names_the_head_and_options():
    assert "head='moss', num_mixtures=4" in repr(build_head("moss", nn.Linear(8, 11), num_mixtures=4))
    assert "head='plif', num_knots=30, knot_range=5.0" in repr(
        build_head("plif", nn.Linear(8, 11), num_knots=30, knot_range=5.0)
    )
    assert "bias=False, head='sigsoftmax'" in repr(build_head("sigsoftmax", nn.Linear(8, 11, bias=False)))


def test_reset_parameters_restores_step_zero_and_keeps_the_weight():
    linear = nn.Linear(8, 11)
    head = build_head("plif", linear, num_knots=5)
    weight = linear.weight.detach().clone()
    with torch.no_grad():
        head.extra.theta.normal_()
    head.reset_parameters()
    x = torch.randn(2, 8)
    torch.testing.assert_close(head(x), linear(x).log_softmax(-1))
    assert torch.equal(linear.weight, weight)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_head("top-k", nn.Linear(8, 11)), ValueError, "head must be one of"),
        (lambda: build_head("mos", None), ValueError, "head='mos' needs the model's LM head"),
        (lambda: build_head("mos", nn.Linear(8, 11), num_mixtures=0), ValueError, "num_mixtures must be an int >= 1"),
        (lambda: build_head("mos", nn.Linear(8, 11), num_mixtures=2.0), TypeError, "num_mixtures must be an int"),
        (lambda: build_head("plif", nn.Linear(8, 11), num_knots=1), ValueError, "num_knots must be an int >= 2"),
        (lambda: build_head("plif", nn.Linear(8, 11), knot_range=0.0), ValueError, "knot_range must be a float in"),
        (lambda: build_head("plif", nn.Linear(8, 11), knot_range=float("nan")), ValueError, "knot_range must be"),
        (lambda: MixtureHead(nn.Linear(8, 11), component="sparsemax"), ValueError, "component must be one of"),
        (lambda: restore_linear(nn.Conv1d(2, 2, 1)), TypeError, "module must be an nn.Linear"),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.GPT2ForSequenceClassification), head="plif"),
            ValueError,
            "head='plif' needs a model with an LM head",
        ),
        (
            lambda: hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), head="mos", num_mixtures=0),
            ValueError,
            "num_mixtures",
        ),
    ],
    ids=[
        "unknown-head",
        "no-linear",
        "mixtures-0",
        "mixtures-float",
        "knots-1",
        "range-0",
        "range-nan",
        "component",
        "restore-non-linear",
        "classifier-model",
        "patch-mixtures-0",
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# Memory: a real-size vocabulary, K components, never K copies of [tokens x V]


def peak_bytes_of_loss_and_backward(model: nn.Module, input_ids: torch.Tensor) -> tuple[int, int]:
    """(peak CPU bytes allocated during forward + loss + backward, bytes autograd saved for the backward)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak, sum(saved.values())


@pytest.mark.parametrize("num_tokens", [128, pytest.param(1024, marks=pytest.mark.slow)], ids=lambda t: f"T{t}")
def test_mixture_memory_does_not_grow_with_components(num_tokens):
    vocab, num_mixtures = 50257, 4
    config = dict(n_layer=1, n_embd=16, n_positions=num_tokens, vocab_size=vocab)
    model = hf_sparse_attn.patch_model(
        tiny_model(transformers.GPT2LMHeadModel, **config), head="mos", num_mixtures=num_mixtures
    )
    input_ids = torch.randint(0, vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0))
    peak, saved = peak_bytes_of_loss_and_backward(model, input_ids)
    logits_bytes = num_tokens * vocab * 4  # one float32 [tokens x V]
    print(
        f"MoS K={num_mixtures}, T={num_tokens}, V={vocab}: peak {peak / logits_bytes:.2f}x and saved for backward "
        f"{saved / logits_bytes:.2f}x one [tokens x V] tensor"
    )
    # The output and the loss's own log_softmax are two [tokens x V] tensors; K = 4 naive components would be >= 8.
    assert saved < 2.5 * logits_bytes
    assert peak < 4 * logits_bytes


# ---------------------------------------------------------------------------------------------------------------
# Training works: a tiny GPT-2 on a WikiText-2 slice lowers its validation loss with every head


@functools.lru_cache(maxsize=1)
def wikitext_ids(data: Path, vocab_size: int, num_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / valid word ids of the first ``num_words`` words (+ ``<eos>`` per line); rare words -> ``<unk>`` = 0."""

    def words(name: str) -> list[str]:
        out: list[str] = []
        with gzip.open(data / "wikitext-2" / name, "rt", encoding="utf-8") as f:
            for line in f:
                out += [*line.split(), "<eos>"]
                if len(out) >= num_words:
                    return out[:num_words]
        return out

    train, valid = words("wiki.train.tokens.gz"), words("wiki.valid.tokens.gz")
    frequent = [w for w, _ in collections.Counter(train).most_common(vocab_size) if w != "<unk>"][: vocab_size - 1]
    index = {word: i + 1 for i, word in enumerate(frequent)}
    return tuple(torch.tensor([index.get(w, 0) for w in ws]) for ws in (train, valid))


@pytest.mark.slow
@pytest.mark.parametrize("head", ["softmax", *HEADS])
def test_training_lowers_the_loss(head, shared_data):
    vocab, length, steps = 2000, 32, 150
    train_ids, valid_ids = wikitext_ids(shared_data, vocab, 60_000)
    valid = valid_ids[: 32 * length].view(32, length)
    model = tiny_model(transformers.GPT2LMHeadModel, vocab_size=vocab, n_positions=length)
    hf_sparse_attn.patch_model(model, head=head, **HEADS.get(head, {}))
    with torch.no_grad():
        before = model(input_ids=valid, labels=valid).loss.item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(train_ids) - length, (16,), generator=generator)
        batch = torch.stack([train_ids[s : s + length] for s in starts])
        optimizer.zero_grad()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=valid, labels=valid).loss.item()
    print(f"{head}: valid loss {before:.3f} at step 0 -> {after:.3f} after {steps} steps")
    assert after < before - 1.0


# ---------------------------------------------------------------------------------------------------------------


def test_docstring_examples():
    results = doctest.testmod(importlib.import_module("hf_sparse_attn.heads"))
    assert results.attempted > 0 and results.failed == 0
