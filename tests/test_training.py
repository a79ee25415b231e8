"""Trainer callbacks: the sparsity warm-up schedule (incl. resuming from a checkpoint) and sparsity logging."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_sparse_attn
from hf_sparse_attn.architectures import self_attention_modules
from hf_sparse_attn.attention import RATE_ATTR
from hf_sparse_attn.training import (
    SparsityLoggingCallback,
    SparsityScheduleCallback,
    add_first,
    scheduled_sparsity,
)

LENGTH = 16


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token blocks; labels = inputs (causal LM)."""

    def __init__(self, size: int = 24, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 99, (size, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=6,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, train_sampling_strategy="sequential",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    return TrainingArguments(**{**options, **overrides})


def patched_gpt2(sparsity, seed: int = 0):
    model = tiny_model(transformers.GPT2LMHeadModel, seed=seed).train()
    return hf_sparse_attn.patch_model(model, sparsity=sparsity)


def current_rates(model) -> list:
    """Each layer's rate as the attention function reads it: None, a float, or a per-head list."""
    rates = [getattr(module, RATE_ATTR) for module in self_attention_modules(model)]
    return [rate.tolist() if isinstance(rate, torch.Tensor) else rate for rate in rates]


class RateRecorder(TrainerCallback):
    """Records the rates in force during each optimizer step (installed after the schedule callback)."""

    def __init__(self) -> None:
        self.rates: dict[int, list] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.rates[state.global_step] = current_rates(model)


def expected_rates(target_per_layer: list, step: int, warmup: int) -> list:
    """Straightforward linear warm-up: min(1, step / warmup) times each target (per head), None stays None."""
    factor = min(1.0, step / warmup)
    out = []
    for target in target_per_layer:
        if target is None:
            out.append(None)
        elif isinstance(target, list):
            out.append([factor * t for t in target])
        else:
            out.append(factor * target)
    return out


def assert_rates_close(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(e, dtype=torch.float64))


def test_training_package_exports_the_callbacks_module_names() -> None:
    """`from hf_sparse_attn.training import X` (the documented path) gives the callbacks module's objects."""
    import hf_sparse_attn.training as training
    from hf_sparse_attn.training import callbacks

    for name in training.__all__:
        assert getattr(training, name) is getattr(callbacks, name), name
    with pytest.raises(AttributeError, match="'hf_sparse_attn.training' has no attribute 'SparsityCallback'"):
        training.SparsityCallback  # noqa: B018


@pytest.mark.parametrize(
    "target, step, warmup",
    [
        (0.5, 0, 10),
        (0.5, 3, 10),
        (0.5, 10, 10),
        (0.5, 25, 10),
        ([None, 0.8], 5, 20),
        ([None, [0.2, 0.4, 0.6, 0.8]], 3, 4),
        ({1: 0.6}, 2, 3),
        (0.7, 4, 0),
    ],
    ids=["start", "early", "end", "after", "per-layer", "per-head", "dict", "no-warmup"],
)
def test_scheduled_sparsity_is_linear_warmup(target, step, warmup):
    per_layer = [None, target[1]] if isinstance(target, dict) else target if isinstance(target, list) else [target] * 2
    expected = per_layer if warmup == 0 else expected_rates(per_layer, step, warmup)
    assert_rates_close(scheduled_sparsity(target, 2, step, warmup), expected)


@pytest.mark.parametrize("warmup", [-1, 1.5, True], ids=["negative", "float", "bool"])
def test_schedule_rejects_bad_warmup(warmup):
    with pytest.raises(ValueError, match="warmup_steps"):
        SparsityScheduleCallback(0.5, warmup)


def test_schedule_rejects_bad_target():
    with pytest.raises(ValueError, match="sparsity"):
        SparsityScheduleCallback(1.5, 10)


def run_schedule(output_dir, target, warmup, resume_from=None, **overrides) -> dict[int, list]:
    model = patched_gpt2(target)
    recorder = RateRecorder()
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=TokenDataset(),
        callbacks=[SparsityScheduleCallback(target, warmup), recorder],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return recorder.rates, model


def test_schedule_follows_global_step_and_resumes_identically(tmp_path):
    target, warmup = [None, [0.2, 0.4, 0.6, 0.8]], 4
    full, model = run_schedule(tmp_path / "full", target, warmup, save_strategy="steps", save_steps=3)
    assert sorted(full) == list(range(6))
    for step, rates in full.items():
        assert_rates_close(rates, expected_rates(target, step, warmup))
    # after the warm-up the model carries the target itself, also in its saved config
    assert_rates_close(current_rates(model), target)
    assert model.config.hf_sparse_attn["sparsity"] == target

    # a fresh model, resumed from the step-3 checkpoint: the remaining steps get the same rates
    resumed, _ = run_schedule(tmp_path / "resumed", target, warmup, resume_from=str(tmp_path / "full" / "checkpoint-3"))
    assert sorted(resumed) == [3, 4, 5]
    for step in resumed:
        assert_rates_close(resumed[step], full[step])


def test_schedule_with_gradient_accumulation_counts_optimizer_steps(tmp_path):
    rates, _ = run_schedule(tmp_path, 0.5, 4, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    assert sorted(rates) == list(range(6))
    for step, layer_rates in rates.items():
        assert_rates_close(layer_rates, [min(1.0, step / 4) * 0.5] * 2)


class LogRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.was_training: list[bool] = []

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        self.logs.append(dict(logs))
        self.was_training.append(model.training)


def causal_zero_fraction(rate: float, length: int) -> float:
    """Zero fraction of r-softmax on an unpadded causal block with distinct scores: query i (1-based) has i valid
    keys, of which ceil(r (i - 1)) fall strictly below the linearly interpolated r-quantile and get weight 0."""
    return sum(math.ceil(rate * (i - 1) - 1e-9) / i for i in range(1, length + 1)) / length


def test_logging_callback_adds_measured_sparsity_to_logs_and_history(tmp_path):
    rate = 0.5
    model = patched_gpt2([None, rate])
    probe = {"input_ids": TokenDataset(size=2, seed=1).ids}
    recorder = LogRecorder()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, logging_steps=2, max_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(size=4, seed=2),
        callbacks=[recorder],
    )
    add_first(trainer, SparsityLoggingCallback(probe))
    trainer.train()

    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    for entry in train_logs:
        assert entry["sparsity/layer_0"] == 0.0  # softmax layer: no exact zeros
        assert entry["sparsity/layer_1"] == pytest.approx(causal_zero_fraction(rate, LENGTH), abs=1e-6)
        assert entry["sparsity/mean"] == pytest.approx(entry["sparsity/layer_1"] / 2)
    # evaluation logs and the end-of-training summary are not measured
    assert all("sparsity/mean" not in e for e in trainer.state.log_history if "loss" not in e)
    # a callback running after it (as report_to backends do) sees the values in `logs`
    seen = [log for log in recorder.logs if "loss" in log]
    assert [log["sparsity/layer_1"] for log in seen] == [entry["sparsity/layer_1"] for entry in train_logs]
    assert all(recorder.was_training[i] for i, log in enumerate(recorder.logs) if "loss" in log)  # mode restored


def test_logging_callback_measures_in_eval_mode_and_restores_mode():
    model = patched_gpt2(0.5)
    callback = SparsityLoggingCallback({"input_ids": TokenDataset(size=2).ids})
    model.train()
    first = callback.measure(model)
    assert model.training
    assert callback.measure(model) == first  # eval mode: no dropout, deterministic
    assert first["sparsity/layer_0"] == pytest.approx(causal_zero_fraction(0.5, LENGTH), abs=1e-6)


def test_logging_callback_needs_input_ids():
    with pytest.raises(ValueError, match="input_ids"):
        SparsityLoggingCallback({"attention_mask": torch.ones(2, 3)})
