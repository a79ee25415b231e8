"""``hf-sparse-attn demo`` end to end (quick mode; offline with the packaged model, and from the loopback Hub) and
the shipped sentiment set it trains on."""

from __future__ import annotations

import contextlib
import csv
import io
import re
from importlib import resources
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers
from conftest import tiny_model, word_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_sparse_attn import from_pretrained, get_patch_config, patch_model
from hf_sparse_attn.commands import cli, demo


def _rows() -> list[dict[str, str]]:
    text = resources.files("hf_sparse_attn").joinpath("data", "sentiment.tsv").read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))


def test_dataset_columns_and_labels():
    rows = _rows()
    assert list(rows[0]) == ["sentence", "label", "split"]
    assert {row["label"] for row in rows} == {"0", "1"}
    assert {row["split"] for row in rows} == {"train", "test"}
    assert all(5 <= len(row["sentence"].split()) <= 25 for row in rows)


@pytest.mark.parametrize("split", ["train", "test"])
def test_dataset_split_is_balanced(split):
    sentences, labels = demo.load_sentiment(split)
    assert len(sentences) == len(labels) >= (250 if split == "train" else 80)
    assert labels.count(0) == labels.count(1)


def test_dataset_has_no_duplicates_and_no_train_test_overlap():
    def norm(sentence: str) -> str:  # also catches copies differing only in case, spacing or punctuation
        return " ".join(re.sub(r"[^\w\s]", "", sentence.lower()).split())

    train = [norm(s) for s in demo.load_sentiment("train")[0]]
    test = [norm(s) for s in demo.load_sentiment("test")[0]]
    assert len(set(train)) == len(train)
    assert len(set(test)) == len(test)
    assert not set(train) & set(test)


def test_load_sentiment_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        demo.load_sentiment("validation")


def test_render_attention_marks_exact_zeros_and_scales_per_row():
    weights = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.05, 0.3, 0.65]])
    lines = demo.render_attention(["[CLS]", "hi", "[SEP]"], weights).splitlines()
    assert lines[0].split() == ["0", "1", "2"]
    # ramp ".:-=+*#%@": 0.05 / 0.65 = 0.08 is in (0, 1/9] -> "."; 0.3 / 0.65 = 0.46 is in (4/9, 5/9] -> "+"
    assert [line.split()[2:] for line in lines[1:]] == [["@", "@", "·"], ["·", "@", "·"], [".", "+", "@"]]
    assert [line.split()[1] for line in lines[1:]] == ["[CLS]", "hi", "[SEP]"]


def test_render_attention_rejects_mismatched_shape():
    with pytest.raises(ValueError, match="shape"):
        demo.render_attention(["a", "b"], torch.ones(3, 3) / 3)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--sparsity", "-0.1"),
        ("--sparsity", "1.5"),
        ("--sparsity", "half"),
        ("--epochs", "0"),
        ("--lr", "-1"),
    ],
    ids=["sparsity-negative", "sparsity-above-1", "sparsity-word", "epochs-0", "lr-negative"],
)
def test_cli_rejects_bad_option(option, value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", option, value])
    assert option in capsys.readouterr().err


QUICK_ARGS = ["demo", "--quick", "--sparsity", "0.6", "--seed", "1"]
FALLBACK = "The Hub is not reachable (HF_HUB_OFFLINE is set): using the packaged offline copy of " + demo.DEFAULT_MODEL


def _run_demo(args: list[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``hf-sparse-attn ARGS`` with the Hub switched off (HF_HUB_OFFLINE)."""
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        code = cli.main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick_run(minilm_path, tmp_path_factory) -> tuple[str, str, Path]:
    """stdout, stderr of one offline ``demo --quick`` run (sparsity 0.6, saving the model), shared below."""
    out_dir = tmp_path_factory.mktemp("demo") / "model"
    code, out, err = _run_demo([*QUICK_ARGS, "--output-dir", str(out_dir)])
    assert code == 0, err
    return out, err, out_dir


def test_demo_falls_back_to_the_packaged_copy_with_one_line(quick_run):
    out, err, _ = quick_run
    assert sum(FALLBACK in line for line in err.splitlines()) == 1
    assert out.startswith(f"{demo.DEFAULT_MODEL} (packaged offline copy) (6 layers x 12 heads)")


def test_demo_prints_sparsity_near_rate_for_every_layer(quick_run):
    output, _, _ = quick_run
    found = dict(re.findall(r"layer (\d+)\s+sparsity (\d\.\d+)", output))
    assert sorted(found) == [str(layer) for layer in range(6)]
    # a row of n valid keys zeroes about 0.6 * (n - 1) of them (quantile with interpolation), so short rows
    # fall a little below 0.6
    assert all(0.5 <= float(value) <= 0.65 for value in found.values()), found


def test_demo_prints_attention_map(quick_run, minilm_path):
    output, _, _ = quick_run
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(demo.DEFAULT_SENTENCE)["input_ids"])
    rows = re.findall(r"^\s*(\d+) (\S+)\s+((?:\s+[·.:\-=+*#%@])+)$", output, flags=re.MULTILINE)
    assert [token for _, token, _ in rows] == tokens
    cells = [cell.split() for _, _, cell in rows]
    assert all(len(row) == len(tokens) for row in cells)
    zeros = sum(row.count("·") for row in cells) / (len(tokens) ** 2)
    assert 0.45 <= zeros <= 0.65  # about 60% of each row's keys are exact zeros


def _accuracy(model, tokenizer, sentences, labels) -> float:
    with torch.no_grad():
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=demo.MAX_LENGTH, return_tensors="pt")
        predictions = model.eval()(**batch).logits.argmax(-1)
    return (predictions == torch.tensor(labels)).float().mean().item()


def test_demo_accuracy_is_what_the_models_score(quick_run, minilm_path):
    # before: the pretrained MiniLM with the classifier the seed initialises, patched; after: the saved model
    output, _, out_dir = quick_run
    before = re.search(r"accuracy before fine-tuning: (\d\.\d+)", output).group(1)
    after = re.search(r"accuracy after fine-tuning:\s+(\d\.\d+)\s+\((\d+) steps", output)
    sentences, labels = (part[: demo.QUICK_SENTENCES] for part in demo.load_sentiment("test"))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    transformers.set_seed(1)
    start = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    patch_model(start, sparsity=0.6)
    assert before == f"{_accuracy(start, tokenizer, sentences, labels):.3f}"
    tuned = from_pretrained(str(out_dir))
    assert after.group(1) == f"{_accuracy(tuned, tokenizer, sentences, labels):.3f}"
    assert int(after.group(2)) == demo.QUICK_STEPS


def test_demo_saves_a_patched_checkpoint_with_its_card(quick_run):
    _, _, out_dir = quick_run
    model = from_pretrained(str(out_dir))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert get_patch_config(model).sparsity == pytest.approx(0.6)
    card = ModelCard.load(out_dir / "README.md")
    assert card.data.library_name == "hf-sparse-attn" and card.data.base_model == demo.DEFAULT_MODEL
    assert "| 5 | r-softmax | 0.6 |" in card.text


def test_demo_is_reproducible_with_a_seed(quick_run):
    def without_timings(output: str) -> list[str]:
        lines = [
            line for line in output.splitlines() if not re.search(r"saved to|total time|runtime|_per_second", line)
        ]
        return [re.sub(r"in \d+ s", "", line) for line in lines]

    first, _, _ = quick_run
    code, again, _ = _run_demo(QUICK_ARGS)
    assert code == 0
    assert without_timings(again) == without_timings(first)


@pytest.mark.parametrize("option, value, bound", [("--map-layer", "6", "0..5"), ("--map-head", "12", "0..11")])
def test_map_options_are_checked_against_the_model(minilm_path, option, value, bound):
    code, _, err = _run_demo(["demo", "--quick", option, value])
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"hf-sparse-attn demo: {option} must be in {bound}")


def test_demo_runs_another_model_given_by_path(tmp_path):
    # a tiny GPT-2 whose tokenizer has no pad token (as GPT-2's): the demo pads with EOS and tells the classifier
    folder = tmp_path / "gpt2"
    tiny_model(transformers.GPT2ForSequenceClassification, num_labels=2).save_pretrained(folder)
    tokenizer = word_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    code, out, err = _run_demo(["demo", "--model", str(folder), "--quick", "--map-layer", "1", "--map-head", "0"])
    assert code == 0, err
    assert "not reachable" not in err
    assert out.startswith(f"{folder} (2 layers x 4 heads) + new 2-way classifier, patched with r-softmax")
    assert re.search(r"accuracy after fine-tuning:\s+\d\.\d+\s+\(3 steps", out)


@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's LFS upload
def test_demo_loads_the_model_from_the_hub_when_it_answers(fake_hub, minilm_path, monkeypatch):
    # the loopback Hub serves the model under its Hub id: no fallback line, the header names the Hub id
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_st")
    api = huggingface_hub.HfApi()
    api.create_repo(demo.DEFAULT_MODEL)
    api.upload_folder(repo_id=demo.DEFAULT_MODEL, folder_path=minilm_path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["demo", "--quick", "--max-steps", "1"]) == 0
    assert "not reachable" not in err.getvalue()
    assert out.getvalue().startswith(f"{demo.DEFAULT_MODEL} (6 layers x 12 heads)")
