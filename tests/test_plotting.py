"""``hf-sparse-attn plot``: a PNG of loss / metric / per-layer sparsity curves from a real short Trainer run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import pytest
from test_training import TokenDataset, patched_gpt2, training_args
from transformers import Trainer

from hf_sparse_attn.commands.cli import main as cli
from hf_sparse_attn.training import SparsityLoggingCallback, SparsityScheduleCallback, add_first
from hf_sparse_attn.training.plots import _layers_label, find_trainer_state, plot_log_history

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Output dir of a 6-step run with a warm-up schedule, sparsity logging, evaluation and checkpoints."""
    output_dir = tmp_path_factory.mktemp("run")
    model = patched_gpt2([None, 0.5])
    args = training_args(output_dir, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=3)  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(size=4, seed=1),
        callbacks=[SparsityScheduleCallback([None, 0.5], warmup_steps=4)],
    )
    add_first(trainer, SparsityLoggingCallback({"input_ids": TokenDataset(size=2, seed=2).ids}))
    trainer.train()
    trainer.save_state()
    return output_dir


def assert_png(path: Path, min_width: int = 400) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= min_width and height >= 200
    assert image.std() > 0  # not a blank canvas


def test_plot_command_writes_png_from_output_dir(run_dir, capsys):
    assert cli(["plot", str(run_dir), "--title", "tiny GPT-2"]) == 0
    assert_png(run_dir / "training.png", min_width=2 * 400)  # loss (train + eval) and sparsity panels
    assert "training.png" in capsys.readouterr().out


def test_plot_reads_latest_checkpoint_of_unfinished_run(run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    for step in (3, 6):
        shutil.copytree(run_dir / f"checkpoint-{step}", unfinished / f"checkpoint-{step}")
    assert find_trainer_state(unfinished) == unfinished / "checkpoint-6" / "trainer_state.json"
    out = tmp_path / "figures" / "curves.png"
    assert cli(["plot", str(unfinished), "--out", str(out)]) == 0
    assert_png(out)


def test_plot_panels_follow_logged_keys(tmp_path):
    # only a training loss: one panel
    history = [{"loss": 2.0 - 0.1 * s, "step": s} for s in range(1, 5)]
    out = plot_log_history(history, tmp_path / "loss.png")
    narrow = matplotlib.image.imread(out).shape[1]
    history += [{"eval_accuracy": 0.5, "eval_runtime": 1.0, "step": 4}, {"sparsity/layer_0": 0.3, "step": 4}]
    wide = matplotlib.image.imread(plot_log_history(history, tmp_path / "all.png")).shape[1]
    assert wide == pytest.approx(3 * narrow, rel=0.05)


def test_plot_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="no trainer_state.json"):
        find_trainer_state(tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": [{"epoch": 1.0, "step": 3}]}))
    with pytest.raises(ValueError, match="no loss"):
        plot_log_history(json.loads((tmp_path / "trainer_state.json").read_text())["log_history"], tmp_path / "x.png")
    assert cli(["plot", str(tmp_path)]) == 2  # the command prints one line instead (tests/test_cli.py)
    assert "no loss, evaluation metric or sparsity values" in capsys.readouterr().err


@pytest.mark.parametrize(
    "layers, label", [([3], "layer 3"), ([0, 1, 2, 3, 4, 5], "layers 0–5"), ([0, 1, 2, 5], "layers 0–2, 5")]
)
def test_layers_sharing_a_curve_are_labelled_as_ranges(layers, label):
    assert _layers_label(layers) == label
