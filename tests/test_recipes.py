"""The fine-tuning recipes end to end (tiny models on synthetic data, and short runs on ../shared/data), and their
data / argument helpers."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from scipy.stats import rankdata
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction

import hf_sparse_attn
from hf_sparse_attn.heads import MixtureHead, MonotonicHead
from hf_sparse_attn.recipe_data import (
    GLUE_TASKS,
    glue_metrics,
    load_glue,
    read_glue_tsv,
    read_text_lines,
    split_lines,
    token_blocks,
    word_level_tokenizer,
)
from hf_sparse_attn.recipe_setup import PATCH_FILE, parse_sparsity

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = "--model_type bert --config_overrides hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=37,max_position_embeddings=64"  # noqa: E501
TINY_GPT2 = "--model_type gpt2 --config_overrides n_embd=32,n_layer=2,n_head=4,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"  # noqa: E501
POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "film", "was", "plot", "and", "a", "very", "story", "acting", "really"]


def recipe(name: str):
    """Import ``recipes/<name>.py`` (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def common_args(output_dir: Path) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
        "--save_strategy", "no", "--learning_rate", "1e-3",
    ]  # fmt: skip


def sentence(rng: random.Random, sentiment: list[str]) -> str:
    words = rng.choices(FILLER, k=5) + rng.choices(sentiment, k=2)
    rng.shuffle(words)
    return " ".join(words)


def synthetic_lines(count: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, POSITIVE if i % 2 else NEGATIVE) + "\n" for i in range(count)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("".join(synthetic_lines()), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    word_level_tokenizer(synthetic_lines()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    """An SST-2-layout task folder: header ``sentence<TAB>label``."""
    folder = tmp_path_factory.mktemp("glue") / "SST-2"
    folder.mkdir()
    rng = random.Random(1)
    for split, size in (("train", 48), ("dev", 16)):
        rows = [(sentence(rng, POSITIVE if i % 2 else NEGATIVE), i % 2) for i in range(size)]
        text = "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in rows)
        (folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    return folder.parent


# ---------------------------------------------------------------- arguments and data


@pytest.mark.parametrize(
    "text, expected",
    [("0.5", 0.5), ("none", None), ("None,0.3", [None, 0.3]), ("softmax, 0.5 ,1", [None, 0.5, 1.0])],
    ids=["float", "none", "per-layer", "spaces"],
)
def test_parse_sparsity(text, expected):
    assert parse_sparsity(text) == expected


def test_parse_sparsity_rejects_words():
    with pytest.raises(ValueError, match="--sparsity"):
        parse_sparsity("0.5,half")


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_read_glue_tsv_layouts(tmp_path):
    # quotes must stay literal text (no CSV quoting): a row starting with " and a lone " in the middle
    cola = write(tmp_path / "cola.tsv", 'gj04\t1\t\t"Quoted" start.\ngj04\t0\t*\tA lone " quote.')  # no header
    assert read_glue_tsv(cola, GLUE_TASKS["cola"]) == {
        "sentence": ['"Quoted" start.', 'A lone " quote.'],
        "label": [1, 0],
    }
    mrpc = write(tmp_path / "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tHe said \"x.\tY\n",
                 encoding="utf-8-sig")  # fmt: skip
    assert read_glue_tsv(mrpc, GLUE_TASKS["mrpc"]) == {"sentence1": ['He said "x.'], "sentence2": ["Y"], "label": [0]}
    stsb = write(tmp_path / "stsb.tsv", "h\n" + "\t".join(["0", "g", "f", "y", "o", "s", "s", "A b.", "C d.", "3.800"]))
    assert read_glue_tsv(stsb, GLUE_TASKS["stsb"]) == {"sentence1": ["A b."], "sentence2": ["C d."], "label": [3.8]}
    rte = write(
        tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tP.\tH.\tnot_entailment\n1\tP\tH\tentailment\n"
    )
    assert read_glue_tsv(rte, GLUE_TASKS["rte"])["label"] == [1, 0]  # the Hub's ids: entailment = 0


@pytest.mark.parametrize(
    "text, match",
    [("sentence\tlabel\ngood\tyes\n", "label 'yes'"), ("sentence\tlabel\nno label here\n", "fields")],
    ids=["bad-label", "short-row"],
)
def test_read_glue_tsv_errors_name_the_line(tmp_path, text, match):
    path = write(tmp_path / "x.tsv", text)
    with pytest.raises(ValueError, match=rf"x\.tsv:2: .*{match}"):
        read_glue_tsv(path, GLUE_TASKS["sst2"])


def test_glue_metrics_match_textbook_formulas():
    logits = np.array([[2.0, 1.0], [0.1, 0.9], [0.3, 0.2], [0.0, 1.0], [1.0, 3.0], [5.0, 0.0]])
    labels = np.array([0, 1, 1, 1, 0, 0])  # predictions 0 1 0 1 1 0: tp=2 tn=2 fp=1 fn=1
    tp, tn, fp, fn = 2, 2, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    prediction = EvalPrediction(predictions=logits, label_ids=labels)
    assert glue_metrics("mrpc")(prediction) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 * precision * recall / (precision + recall)}
    )
    assert glue_metrics("cola")(prediction) == pytest.approx({"matthews_correlation": mcc})
    scores, gold = np.array([[0.5], [2.0], [1.0], [4.0]]), np.array([1.0, 3.0, 1.5, 3.5])
    pearson = np.corrcoef(scores[:, 0], gold)[0, 1]
    spearman = np.corrcoef(rankdata(scores[:, 0]), rankdata(gold))[0, 1]
    assert glue_metrics("stsb")(EvalPrediction(predictions=scores, label_ids=gold)) == pytest.approx(
        {"pearson": pearson, "spearmanr": spearman}
    )


def test_unknown_task_lists_tasks():
    with pytest.raises(ValueError, match="cola, sst2, mrpc, stsb, rte"):
        load_glue("qnli", "anywhere")


def test_load_glue_from_hub_keeps_train_and_validation(monkeypatch):
    import datasets

    fake = {
        s: datasets.Dataset.from_dict({"sentence": ["a"], "label": [1], "idx": [0]})
        for s in ("train", "validation", "test")
    }
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args: calls.append(args) or fake)
    loaded = load_glue("sst2")
    assert calls == [("nyu-mll/glue", "sst2")]
    assert sorted(loaded) == ["train", "validation"]


@pytest.mark.parametrize(
    "task, rows",
    [
        ("cola", (8551, 1043)),
        ("sst2", (67349, 872)),
        ("mrpc", (3668, 408)),
        ("stsb", (5749, 1500)),
        ("rte", (2490, 277)),
    ],
)
def test_load_glue_real_files_row_counts(shared_data, task, rows):
    """Row counts from ../shared/data/MANIFEST.md (every row read; no merged or dropped rows)."""
    data = load_glue(task, shared_data / "glue")
    assert (data["train"].num_rows, data["validation"].num_rows) == rows


def test_load_glue_real_labels(shared_data):
    dev = load_glue("rte", shared_data / "glue" / "RTE")["validation"]  # the task folder works too
    assert sum(label == 0 for label in dev["label"]) == 146  # entailment count in the manifest
    assert load_glue("mrpc", shared_data / "glue")["train"]["sentence1"][0].startswith("Amrozi accused")  # no BOM


def test_token_blocks_concatenate_and_cut(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = synthetic_lines(30)
    stream = [i for line in lines for i in tokenizer(line)["input_ids"]]
    blocks = token_blocks(lines, tokenizer, block_size=16, chunk_lines=7)
    assert blocks == [stream[i : i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    assert token_blocks(lines, tokenizer, block_size=16, max_blocks=3, chunk_lines=7) == blocks[:3]


def test_word_level_tokenizer_ids_are_contiguous_and_lines_end_with_eos():
    tokenizer = word_level_tokenizer(["a b b\n", "c b <unk>\n"], vocab_size=6)
    vocab = tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(tokenizer))) == list(range(6))
    assert tokenizer("b c zzz")["input_ids"] == [
        vocab["b"],
        tokenizer.unk_token_id,
        tokenizer.unk_token_id,
        tokenizer.eos_token_id,
    ]


def test_split_lines_holds_out_the_end():
    lines = [f"{i}\n" for i in range(40)]
    assert split_lines(lines, 5) == (lines[:38], lines[38:])
    with pytest.raises(ValueError, match="validation_split_percentage"):
        split_lines(lines, 0)


def test_read_text_lines_reads_gzip(tmp_path):
    import gzip

    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("x y\nz\n")
    write(tmp_path / "b.tokens", "w\n")
    assert read_text_lines([tmp_path / "a.txt.gz", tmp_path / "b.tokens"]) == ["x y\n", "z\n", "w\n"]


# ---------------------------------------------------------------- recipes end to end


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_classification_recipe_trains_patched_model_with_warmup(tmp_path, sst2_dir, tokenizer_dir):
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task", "sst2", "--data_dir", str(sst2_dir),
            "--sparsity", "0.5", "--sparsity_warmup_steps", "2", "--max_steps", "4", "--logging_steps", "2",
            "--per_device_train_batch_size", "8", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("classification").main(argv)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_sparse_attn"]["sparsity"] == 0.5  # warm-up finished: the target, in the user's form
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    logs = [e for e in log_history(tmp_path) if "loss" in e]
    assert [e["step"] for e in logs] == [2, 4] and all("sparsity/layer_1" in e for e in logs)
    # step 2 measures the rate of the 2nd step (r = 0.25), step 4 the target: more zeros
    assert logs[0]["sparsity/mean"] < logs[1]["sparsity/mean"]


def test_classification_recipe_regression(tmp_path, tokenizer_dir):
    rng = random.Random(2)
    folder = tmp_path / "STS-B"
    folder.mkdir()
    for split in ("train", "dev"):
        rows = ["\t".join(["0", "g", "f", "y", "o", "s", "s", sentence(rng, POSITIVE), sentence(rng, NEGATIVE),
                           f"{rng.uniform(0, 5):.3f}"]) for _ in range(12)]  # fmt: skip
        write(folder / f"{split}.tsv", "header\n" + "\n".join(rows) + "\n")
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task", "stsb", "--data_dir", str(folder),
            "--sparsity", "0.5", "--max_steps", "2", *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("classification").main(argv)
    assert {"eval_pearson", "eval_spearmanr"} <= set(metrics)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["problem_type"] == "regression"


def test_classification_recipe_real_rte_minilm(tmp_path, shared_data, minilm_path):
    argv = ["--model_name_or_path", minilm_path, "--task", "rte", "--data_dir", str(shared_data / "glue"),
            "--max_train_samples", "8", "--max_eval_samples", "8", "--max_seq_length", "32", "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--sparsity", "0.5", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("classification").main(argv)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["hf_sparse_attn"]["sparsity"] == 0.5


def test_causal_lm_recipe_head_and_perplexity(tmp_path, text_file, tokenizer_dir):
    argv = [*TINY_GPT2.split(), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(text_file),
            "--validation_split_percentage", "10", "--block_size", "16", "--max_eval_samples", "4",
            "--per_device_eval_batch_size", "4", "--head", "moss", "--num_mixtures", "2", "--sparsity", "0.3",
            "--sparsity_warmup_steps", "2", "--max_steps", "4", "--logging_steps", "1",
            *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    losses = [e["loss"] for e in log_history(tmp_path) if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    # the checkpoint comes back patched, with the trained head, and reproduces the evaluation loss
    model = hf_sparse_attn.from_pretrained(tmp_path).eval()
    assert isinstance(model.lm_head, MixtureHead) and model.lm_head.head_name == "moss"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    held_out = split_lines(read_text_lines(text_file), 10)[1]
    ids = torch.tensor(token_blocks(held_out, tokenizer, 16, max_blocks=4))
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean()
    assert float(nll) == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_causal_lm_recipe_real_ptb(tmp_path, shared_data):
    ptb = shared_data / "ptb"
    word_level_tokenizer(read_text_lines(ptb / "ptb.valid.txt.gz")).save_pretrained(tmp_path / "tok")
    argv = [*TINY_GPT2.split(), "--tokenizer_name", str(tmp_path / "tok"),
            "--train_file", str(ptb / "ptb.train.txt.gz"), "--validation_file", str(ptb / "ptb.valid.txt.gz"),
            "--block_size", "32", "--max_train_samples", "16",
            "--max_eval_samples", "8", "--head", "plif", "--num_knots", "100", "--sparsity", "0.5", "--max_steps", "2",
            *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    assert math.isfinite(metrics["eval_perplexity"])
    assert isinstance(hf_sparse_attn.from_pretrained(tmp_path / "out").lm_head, MonotonicHead)


def test_masked_lm_recipe_per_layer_sparsity(tmp_path, text_file, tokenizer_dir):
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(text_file),
            "--block_size", "16", "--max_eval_samples", "4", "--head", "plif", "--num_knots", "50",
            "--sparsity", "none,0.5", "--max_steps", "2", "--logging_steps", "1", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("masked_lm").main(argv)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    logs = [e for e in log_history(tmp_path) if "loss" in e]
    assert all(e["sparsity/layer_0"] == 0.0 and e["sparsity/layer_1"] >= 0.4 for e in logs)
    patch = hf_sparse_attn.get_patch_config(hf_sparse_attn.from_pretrained(tmp_path))
    assert (patch.sparsity, patch.head, patch.num_knots) == ([None, 0.5], "plif", 50)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # from peft
def test_causal_lm_recipe_lora_adapter_reloads(tmp_path, text_file, tokenizer_dir):
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(tokenizer))
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")  # a "pretrained" model
    tokenizer.save_pretrained(tmp_path / "base")
    argv = ["--model_name_or_path", str(tmp_path / "base"), "--train_file", str(text_file), "--block_size", "16",
            "--max_eval_samples", "4", "--per_device_eval_batch_size", "4", "--head", "plif", "--num_knots", "50",
            "--sparsity", "0.5", "--lora", "--lora_r", "4", "--max_steps", "3",
            *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()

    # the documented reload: patch a fresh base with the saved options, then load the adapter
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf_sparse_attn.patch_model(base, **json.loads((out / PATCH_FILE).read_text()))
    model = PeftModel.from_pretrained(base, out).eval()
    held_out = split_lines(read_text_lines(text_file), 5)[1]
    ids = torch.tensor(token_blocks(held_out, tokenizer, 16, max_blocks=4))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(metrics["eval_loss"], rel=1e-5)
