"""The reproduction drivers (benchmarks/reproduce/) on tiny grids: real recipes, tiny models, a few steps.

Checked: one JSON per finished run with its metrics and learning curve, finished runs skipped on restart, the
first seed's checkpoint kept and the others' deleted, the fine-tuning row refusing to start without its origin, and
the summariser's tables (numbers recomputed here from the JSON) and plots.
"""

from __future__ import annotations

import gzip
import json
import random
import statistics
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # the drivers are `benchmarks.reproduce.*`


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A 2-layer, width-16 BERT with MiniLM's tokenizer (random weights: the driver, not the model, is tested)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder laid out like PTB (``ptb/ptb.{train,valid,test}.txt.gz``): random sentences over 30 words."""
    data = tmp_path_factory.mktemp("data")
    (data / "ptb").mkdir()
    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    for split, lines in (("train", 120), ("valid", 30), ("test", 30)):
        text = "\n".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(lines)) + "\n"
        with gzip.open(data / "ptb" / f"ptb.{split}.txt.gz", "wt", encoding="utf-8") as f:
            f.write(text)
    return data


def glue_argv(tiny_bert: str, shared_data: Path, tmp_path: Path) -> list[str]:
    return ["--model", tiny_bert, "--data-dir", str(shared_data), "--tasks", "rte", "--seeds", "0,1",
            "--max-train-samples", "8", "--max-eval-samples", "8", "--epochs", "1", "--batch-size", "4",
            "--results-dir", str(tmp_path / "results"), "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--in-process"]  # fmt: skip


def test_glue_driver_writes_one_json_per_run_and_skips_finished_runs(
    tiny_bert: str, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks.reproduce import glue

    argv = [*glue_argv(tiny_bert, shared_data, tmp_path), "--only", "rte-softmax-seed1", "--only", "rte-r0.5-seed0"]
    assert glue.main(argv) == 0
    paths = sorted((tmp_path / "results" / "glue").glob("*.json"))
    assert [p.name.rsplit("-", 1)[0] for p in paths] == ["rte-r0.5-seed0", "rte-softmax-seed1"]
    records = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in paths}
    sparse, softmax = records["rte-r0.5-seed0"], records["rte-softmax-seed1"]
    assert sparse["config"]["sparsity"] == 0.5 and softmax["config"]["sparsity"] is None
    assert 0.0 <= sparse["metrics"]["eval"]["eval_accuracy"] <= 1.0
    assert sparse["steps"] == 2 and not sparse["resumed"] and sparse["cpu_seconds"] > 0 and sparse["parameters"] > 0
    # the warm-up reaches r = 0.5 at the last step; rows hold >= 10 valid keys, so whole-key rounding moves the
    # zero fraction by at most 1/10
    last = [entry["sparsity/mean"] for entry in sparse["log_history"] if "sparsity/mean" in entry][-1]
    assert last == pytest.approx(0.5, abs=0.1)
    assert any("eval_accuracy" in entry for entry in sparse["log_history"])  # the learning-curve points
    assert not any("sparsity/mean" in entry for entry in softmax["log_history"])
    # the first seed's checkpoint is kept (model card, later starts); other seeds' are deleted
    assert (Path(sparse["checkpoint"]) / "config.json").is_file() and softmax["checkpoint"] is None
    assert [p.name.rsplit("-", 1)[0] for p in (tmp_path / "ckpt" / "glue").iterdir()] == ["rte-r0.5-seed0"]

    capsys.readouterr()
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert glue.main(argv) == 0
    assert "skip glue/rte-r0.5-seed0 (done)" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in paths] == stamps

    from benchmarks.reproduce.summarise import render_cards

    (card,) = render_cards(tmp_path / "results", tmp_path / "cards")
    text = card.read_text()
    assert card.parent.name == "minilm-rte-r0.5" and f"base_model: {glue.BASE_MODEL}" in text
    assert "| 0 | r-softmax | 0.5 |" in text and "nyu-mll/glue" in text

    assert glue.main([*glue_argv(tiny_bert, shared_data, tmp_path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "done  glue/rte-r0.5-seed0" in listing and "todo  glue/rte-r0.25-seed0" in listing
    assert "6 runs, 4 to do" in listing and "CPU-hours" in listing  # seeds per setting: 2, 1, 2, 1


def lm_argv(data: Path, tmp_path: Path) -> list[str]:
    return ["--data-dir", str(data), "--corpora", "ptb", "--heads", "softmax,mos", "--seeds", "0", "--layers", "1",
            "--width", "16", "--block-size", "16", "--epochs", "1", "--finetune-epochs", "1", "--batch-size", "4",
            "--max-train-samples", "8", "--results-dir", str(tmp_path / "results"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--in-process"]  # fmt: skip


def test_finetune_row_needs_its_origin_checkpoint(tiny_corpus: Path, tmp_path: Path) -> None:
    from benchmarks.reproduce import lm_heads

    with pytest.raises(FileNotFoundError, match="starts from ptb-softmax-seed0's checkpoint"):
        lm_heads.main([*lm_argv(tiny_corpus, tmp_path), "--only", "ptb-finetune-mos-seed0"])


def test_only_matching_nothing_is_an_error(tiny_corpus: Path, tmp_path: Path) -> None:
    from benchmarks.reproduce import lm_heads

    with pytest.raises(ValueError, match="no run of the grid matches"):
        lm_heads.main([*lm_argv(tiny_corpus, tmp_path), "--only", "wt2-*"])


def test_lm_driver_and_summariser(tiny_corpus: Path, tmp_path: Path) -> None:
    from benchmarks.reproduce import lm_heads, summarise

    assert lm_heads.main(lm_argv(tiny_corpus, tmp_path)) == 0
    records = {}
    for path in (tmp_path / "results" / "lm_heads").glob("*.json"):
        record = json.loads(path.read_text())
        records[record["name"]] = record
    assert sorted(records) == ["ptb-finetune-mos-seed0", "ptb-finetune-softmax-seed0", "ptb-mos-seed0",
                               "ptb-softmax-seed0"]  # fmt: skip
    for record in records.values():
        for split in ("eval", "test"):
            assert record["metrics"][split]["eval_perplexity"] > 1.0
    assert records["ptb-mos-seed0"]["parameters"] > records["ptb-softmax-seed0"]["parameters"]
    start = records["ptb-finetune-mos-seed0"]["argv"]
    assert start[start.index("--model_name_or_path") + 1] == records["ptb-softmax-seed0"]["checkpoint"]

    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    markers = "".join(
        f"<!-- reproduce:{k} -->\nold\n<!-- /reproduce:{k} -->\n" for k in ("glue", "lm_heads", "finetune")
    )
    doc.write_text("# Results\n\n" + markers + "end\n")
    text = summarise.summarise(tmp_path / "results", doc, tmp_path / "docs" / "images")
    assert "old" not in text and text.endswith("end\n") and "_No finished run yet._" in text  # no GLUE run
    mos = records["ptb-mos-seed0"]
    row = (f"| ptb | mos | {mos['metrics']['eval']['eval_perplexity']:.2f} | "
           f"{mos['metrics']['test']['eval_perplexity']:.2f} | "
           f"{mos['parameters'] - records['ptb-softmax-seed0']['parameters']:+,} |")  # fmt: skip
    assert row in text
    assert "| ptb-finetune | softmax |" in text and "| ptb | softmax |" in text
    image = tmp_path / "docs" / "images" / summarise.LM_PLOT
    assert image.read_bytes().startswith(PNG_MAGIC)
    assert f"![lm_heads results](images/{summarise.LM_PLOT})" in text
    assert summarise.summarise(tmp_path / "results", doc, tmp_path / "docs" / "images") == text  # idempotent

    # cards for the kept checkpoints of patched settings only (softmax models carry no patch to describe)
    cards = summarise.render_cards(tmp_path / "results", tmp_path / "cards")
    assert sorted(path.parent.name for path in cards) == ["gpt2-ptb-finetune-mos", "gpt2-ptb-mos"]
    card = (tmp_path / "cards" / "gpt2-ptb-mos" / "README.md").read_text()
    assert "library_name: hf-sparse-attn" in card and "mixture of 4 softmaxes (MoS)" in card
    assert "test perplexity" in card and "ptb-text-only/ptb_text_only" in card


def test_summariser_mean_and_sd_over_seeds() -> None:
    from benchmarks.reproduce.summarise import mean_sd

    values = [0.61, 0.65, 0.70]
    assert mean_sd(values, 4) == f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert mean_sd([0.5], 4) == "0.5000"


def test_summariser_needs_the_markers(tmp_path: Path) -> None:
    from benchmarks.reproduce.summarise import summarise

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n<!-- reproduce:glue -->\n<!-- /reproduce:glue -->\n")
    with pytest.raises(ValueError, match="reproduce:lm_heads"):
        summarise(tmp_path / "none", doc, tmp_path / "images")
