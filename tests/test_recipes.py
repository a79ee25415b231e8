"""The fine-tuning recipes end to end (tiny models on synthetic data, and short runs on ../shared/data), their data
loading through ``datasets`` (GLUE TSV release, Hub-style dataset folders, csv / text files) and their metrics
through the packaged ``evaluate`` modules."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import random
import sys
from itertools import chain
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
import transformers
from scipy.stats import rankdata
from transformers import AutoModelForCausalLM, AutoTokenizer, EvalPrediction, HfArgumentParser

import hf_sparse_attn
from hf_sparse_attn.heads import MixtureHead, MonotonicHead
from hf_sparse_attn.patch import PATCH_FILE
from hf_sparse_attn.training.data import (
    GLUE_TASKS,
    file_builder,
    group_texts,
    load_classification,
    load_text,
    read_glue_tsv,
    word_level_tokenizer,
)
from hf_sparse_attn.training.metrics import (
    GLUE_SCRIPT,
    glue_compute_metrics,
    load_glue_metric,
    load_perplexity_metric,
    token_nll,
)
from hf_sparse_attn.training.recipe import parse_sparsity

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = "--model_type bert --config_overrides hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=37,max_position_embeddings=64"  # noqa: E501
TINY_GPT2 = "--model_type gpt2 --config_overrides n_embd=32,n_layer=2,n_head=4,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0"  # noqa: E501
POSITIVE = ["good", "great", "fine", "nice", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "weak"]
FILLER = ["the", "film", "was", "plot", "and", "a", "very", "story", "acting", "really"]
#: rows of the GLUE release files (../shared/data/MANIFEST.md): train, dev, test
GLUE_ROWS = {
    "cola": (8551, 1043, 1063),
    "sst2": (67349, 872, 1821),
    "mrpc": (3668, 408, 1725),
    "stsb": (5749, 1500, 1379),
    "rte": (2490, 277, 3000),
}


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
        "--save_strategy", "no", "--learning_rate", "1e-3", "--do_train", "--do_eval",
    ]  # fmt: skip


def sentence(rng: random.Random, sentiment: list[str]) -> str:
    words = rng.choices(FILLER, k=5) + rng.choices(sentiment, k=2)
    rng.shuffle(words)
    return " ".join(words)


def synthetic_lines(count: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, POSITIVE if i % 2 else NEGATIVE) + "\n" for i in range(count)]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("text") / "train.txt", "".join(synthetic_lines()))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    word_level_tokenizer(synthetic_lines()).save_pretrained(path)
    return path


def sst2_rows(size: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(sentence(rng, POSITIVE if i % 2 else NEGATIVE), i % 2) for i in range(size)]


@pytest.fixture(scope="module")
def sst2_dir(tmp_path_factory) -> Path:
    """A GLUE release folder with an SST-2 task folder: header ``sentence<TAB>label``; test ``index<TAB>sentence``."""
    folder = tmp_path_factory.mktemp("glue") / "SST-2"
    folder.mkdir()
    for split, size, seed in (("train", 48, 1), ("dev", 16, 2)):
        text = "sentence\tlabel\n" + "".join(f"{s}\t{label}\n" for s, label in sst2_rows(size, seed))
        write(folder / f"{split}.tsv", text)
    write(folder / "test.tsv", "index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(sst2_rows(6, 3))))
    return folder.parent


@pytest.fixture(scope="module")
def hub_glue_folder(tmp_path_factory) -> Path:
    """A local copy of the layout of the Hub's ``nyu-mll/glue`` repository (one folder of parquet files per
    configuration, declared in README.md), with an ``sst2`` configuration: what ``--dataset_name`` downloads."""
    folder = tmp_path_factory.mktemp("nyu-mll-glue")
    (folder / "sst2").mkdir()
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )
    for split, size, seed in (("train", 40, 4), ("validation", 12, 5), ("test", 5, 6)):
        rows = sst2_rows(size, seed)
        labels = [label if split != "test" else -1 for _, label in rows]
        data = {"sentence": [s for s, _ in rows], "label": labels, "idx": list(range(size))}
        datasets.Dataset.from_dict(data, features=features).to_parquet(
            folder / "sst2" / f"{split}-00000-of-00001.parquet"
        )
    splits = "\n".join(f"  - split: {s}\n    path: sst2/{s}-*" for s in ("train", "validation", "test"))
    write(folder / "README.md", f"---\nconfigs:\n- config_name: sst2\n  data_files:\n{splits}\n---\n")
    return folder


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "text, expected",
    [("0.5", 0.5), ("none", None), ("None,0.3", [None, 0.3]), ("softmax, 0.5 ,1", [None, 0.5, 1.0])],
    ids=["float", "none", "per-layer", "spaces"],
)
def test_parse_sparsity(text, expected):
    assert parse_sparsity(text) == expected


@pytest.mark.parametrize("text", ["", " ", "0.5,", ",0.5", "none,,0.5"], ids=["empty", "blank", "trailing",
                                                                              "leading", "double"])  # fmt: skip
def test_parse_sparsity_rejects_empty_entries(text):
    with pytest.raises(ValueError, match=r"--sparsity .*entry \d is empty"):
        parse_sparsity(text)


def test_parse_sparsity_rejects_words():
    with pytest.raises(ValueError, match="--sparsity"):
        parse_sparsity("0.5,half")


@pytest.mark.parametrize("text", ["", "0.5,"], ids=["empty", "trailing-comma"])
def test_recipe_rejects_malformed_sparsity_before_loading(tmp_path, text):
    argv = ["--train_file", str(tmp_path / "absent.txt"), "--sparsity", text, "--do_train", "--output_dir",
            str(tmp_path)]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--sparsity .*entry \d is empty"
    ):  # not "file not found": parsing fails first
        recipe("causal_lm").main(argv)


def test_task_alias_and_run_glue_names():
    module = recipe("classification")
    parser = HfArgumentParser(module.GlueArguments)
    (by_alias,) = parser.parse_args_into_dataclasses(["--task", "rte", "--max_seq_length", "32"])
    (by_name,) = parser.parse_args_into_dataclasses(["--task_name", "rte", "--max_seq_length", "32"])
    assert by_alias == by_name and by_name.task_name == "rte"
    with pytest.raises(SystemExit):  # argparse's error lists the choices
        parser.parse_args_into_dataclasses(["--task_name", "qnli"])


def test_recipes_need_a_stage(tmp_path, sst2_dir, tokenizer_dir):
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task_name", "sst2", "--data_dir",
            str(sst2_dir), "--output_dir", str(tmp_path), "--use_cpu"]  # fmt: skip
    with pytest.raises(ValueError, match="nothing to do: pass --do_train, --do_eval and/or --do_predict"):
        recipe("classification").main(argv)
    with pytest.raises(ValueError, match="--do_predict: this recipe has no test-set prediction"):
        recipe("causal_lm").main(["--train_file", "x.txt", "--do_predict", "--output_dir", str(tmp_path)])


# ---------------------------------------------------------------- GLUE data


def test_read_glue_tsv_layouts(tmp_path):
    # quotes stay literal text (no CSV quoting); "NA" / "nan" stay text (no NA guessing)
    cola = write(tmp_path / "cola.tsv", 'gj04\t1\t\t"Quoted" start.\ngj04\t0\t*\tA lone " quote.\nx\t1\t\tNA')
    data = read_glue_tsv(cola, GLUE_TASKS["cola"])  # no header, no final newline
    assert data.to_dict() == {
        "sentence": ['"Quoted" start.', 'A lone " quote.', "NA"],
        "label": [1, 0, 1],
        "idx": [0, 1, 2],
    }
    assert data.features["label"].names == ["unacceptable", "acceptable"]  # the Hub's ClassLabel
    mrpc = write(tmp_path / "mrpc.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tHe said \"x.\tnan\n",
                 encoding="utf-8-sig")  # fmt: skip
    assert read_glue_tsv(mrpc, GLUE_TASKS["mrpc"]).to_dict() == {
        "sentence1": ['He said "x.'],
        "sentence2": ["nan"],
        "label": [0],
        "idx": [0],
    }
    stsb = write(tmp_path / "stsb.tsv", "h\n" + "\t".join(["0", "g", "f", "y", "o", "s", "s", "A b.", "C d.", "3.800"]))
    assert read_glue_tsv(stsb, GLUE_TASKS["stsb"])["label"][0] == pytest.approx(3.8)  # float32, as on the Hub
    rte = write(
        tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\tP.\tH.\tnot_entailment\n1\tP\tH\tentailment\n"
    )
    assert read_glue_tsv(rte, GLUE_TASKS["rte"])["label"] == [1, 0]  # the Hub's ids: entailment = 0
    test = write(tmp_path / "test.tsv", "index\tsentence1\tsentence2\n0\tP.\tH.\n")
    assert read_glue_tsv(test, GLUE_TASKS["rte"], "test").to_dict() == {
        "sentence1": ["P."],
        "sentence2": ["H."],
        "label": [-1],
        "idx": [0],
    }


@pytest.mark.parametrize(
    "task, text, match",
    [
        ("sst2", "sentence\tlabel\ngood\t1\ngood\tyes\n", "label 'yes' is not one of"),
        ("sst2", "sentence\tlabel\ngood\t1\nno label here\n",
         "field 'label' is empty or missing; expected 2 tab-separated fields"),
        ("stsb", "h\n" + "\t".join("0gfyoss") + "\tA.\tB.\t1.0\n" + "\t".join("0gfyoss") + "\tA.\tB.\tnan\n",
         "label 'nan' is not a finite number"),
        ("stsb", "h\n" + "\t".join("0gfyoss") + "\tA.\tB.\t1.0\n" + "\t".join("0gfyoss") + "\tA.\tB.\thigh\n",
         "label 'high' is not a number"),
    ],
    ids=["bad-label", "short-row", "stsb-nan", "stsb-word"],
)  # fmt: skip
def test_read_glue_tsv_errors_name_the_line(tmp_path, task, text, match):
    path = write(tmp_path / "x.tsv", text)
    with pytest.raises(ValueError, match=rf"x\.tsv:3: {match}"):
        read_glue_tsv(path, GLUE_TASKS[task])


def test_unknown_task_lists_tasks():
    with pytest.raises(ValueError, match="--task_name must be one of cola, sst2, mrpc, stsb, rte"):
        load_classification(task_name="qnli", data_dir="anywhere")


def test_hub_style_dataset_folder_by_name(hub_glue_folder):
    """``--dataset_name`` goes to ``load_dataset`` with the configuration; a Hub repository's layout loads the same."""
    data = load_classification(task_name="sst2", dataset_name=str(hub_glue_folder), splits=("train", "test"))
    assert sorted(data.raw) == ["test", "train"] and data.raw["train"].num_rows == 40
    assert data.label_names == ("negative", "positive") and data.metric_config == "sst2"
    generic = load_classification(dataset_name=str(hub_glue_folder), dataset_config_name="sst2")
    assert generic.label_names == ("negative", "positive") and generic.text_columns == ("sentence",)
    assert generic.raw["validation"]["sentence"] == [s for s, _ in sst2_rows(12, 5)]


def test_csv_and_json_files_like_run_glue(tmp_path):
    write(tmp_path / "train.csv", "sentence1,sentence2,label\nA,B,yes\nC,D,no\nE,F,yes\n")
    write(tmp_path / "dev.json", '{"sentence1": "G", "sentence2": "H", "label": "no"}\n')
    with pytest.raises(ValueError, match="same format"):
        load_classification(files={"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.json")})
    write(tmp_path / "dev.csv", "sentence1,sentence2,label\nG,H,no\nI,J,maybe\n")
    with pytest.raises(ValueError, match=r"dev\.csv:3: label 'maybe' does not occur in the training data"):
        load_classification(files={"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv")})
    data = load_classification(files={"train": str(tmp_path / "train.csv")}, splits=("train",))
    assert data.label_names == ("no", "yes") and data.raw["train"]["label"] == [1, 0, 1]
    assert data.text_columns == ("sentence1", "sentence2") and data.metric_config == "sst2"


def test_regression_file_with_nan_label_names_file_and_line(tmp_path):
    path = write(tmp_path / "train.tsv", "sentence\tlabel\nA\t1.5\nB\tnan\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: label is missing or NaN, not a finite number"):
        load_classification(files={"train": str(path)}, splits=("train",))


@pytest.mark.parametrize("task", list(GLUE_ROWS))
def test_glue_release_row_counts(shared_data, task):
    """Row counts from ../shared/data/MANIFEST.md: every row read, none merged or dropped, test files included."""
    data = load_classification(task_name=task, data_dir=str(shared_data / "glue"),
                               splits=("train", "validation", "test"))  # fmt: skip
    assert tuple(data.raw[s].num_rows for s in ("train", "validation", "test")) == GLUE_ROWS[task]
    assert set(data.raw["test"]["label"]) == {-1}


def test_glue_release_labels(shared_data):
    rte = load_classification(task_name="rte", data_dir=str(shared_data / "glue" / "RTE"))  # a task folder works too
    assert sum(label == 0 for label in rte.raw["validation"]["label"]) == 146  # entailment count in the manifest
    mrpc = load_classification(task_name="mrpc", data_dir=str(shared_data / "glue"), splits=("train",))
    assert mrpc.raw["train"]["sentence1"][0].startswith("Amrozi accused")  # no byte-order mark
    assert mrpc.raw["train"].features == datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": datasets.Value("int32"),
        }
    )  # the features of nyu-mll/glue


# ---------------------------------------------------------------- metrics


def test_glue_metric_matches_textbook_formulas():
    logits = np.array([[2.0, 1.0], [0.1, 0.9], [0.3, 0.2], [0.0, 1.0], [1.0, 3.0], [5.0, 0.0]])
    labels = np.array([0, 1, 1, 1, 0, 0])  # predictions 0 1 0 1 1 0: tp=2 tn=2 fp=1 fn=1
    tp, tn, fp, fn = 2, 2, 1, 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    prediction = EvalPrediction(predictions=logits, label_ids=labels)
    assert glue_compute_metrics("mrpc", False)(prediction) == pytest.approx(
        {"accuracy": 4 / 6, "f1": 2 * precision * recall / (precision + recall)}
    )
    assert glue_compute_metrics("cola", False)(prediction) == pytest.approx({"matthews_correlation": mcc})
    assert glue_compute_metrics("rte", False)(prediction) == pytest.approx({"accuracy": 4 / 6})
    scores, gold = np.array([[0.5], [2.0], [1.0], [4.0]]), np.array([1.0, 3.0, 1.5, 3.5])
    pearson = np.corrcoef(scores[:, 0], gold)[0, 1]
    spearman = np.corrcoef(rankdata(scores[:, 0]), rankdata(gold))[0, 1]
    # the Hub module's stsb features are float32: the correlations of float32 inputs, to float32 precision
    assert glue_compute_metrics("stsb", True)(EvalPrediction(predictions=scores, label_ids=gold)) == pytest.approx(
        {"pearson": pearson, "spearmanr": spearman}, rel=10 * np.finfo(np.float32).eps
    )


def test_glue_metric_is_an_evaluate_module():
    metric = evaluate.load(GLUE_SCRIPT, config_name="mrpc", keep_in_memory=True)
    assert isinstance(metric, evaluate.EvaluationModule)
    metric.add_batch(predictions=[1, 1], references=[1, 0])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute() == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3})  # P = 1/2, R = 1
    combined = evaluate.combine([load_glue_metric("cola"), load_glue_metric("sst2")])
    assert combined.compute(predictions=[0, 1], references=[0, 1]) == {"matthews_correlation": 1.0, "accuracy": 1.0}
    with pytest.raises(ValueError, match="config_name must be one of cola, stsb, mrpc"):
        load_glue_metric("imdb")


def test_perplexity_metric():
    metric = load_perplexity_metric()
    metric.add_batch(predictions=[math.log(2.0), math.log(8.0)])
    metric.add_batch(predictions=[math.log(4.0)])
    result = metric.compute()
    assert result["perplexity"] == pytest.approx(4.0, rel=1e-12) and result["num_tokens"] == 3  # (2·8·4)^(1/3)
    for bad, match in (([], "no token was scored"), ([1.0, float("nan")], "finite"), ([-0.5], ">= 0")):
        with pytest.raises(ValueError, match=match):
            load_perplexity_metric().compute(predictions=bad)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "masked"])
def test_token_nll_aligns_with_labels(causal):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[1, 2] = -100
    nll = token_nll(logits, labels, causal=causal)
    assert nll.shape == labels.shape
    for b in range(2):
        for t in range(5):
            source = t - 1 if causal else t
            if source < 0 or labels[b, t] == -100:
                assert nll[b, t] == 0
            else:
                expected = -torch.log(torch.softmax(logits[b, source], -1)[labels[b, t]])
                assert nll[b, t] == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- text data


def test_load_text_holds_out_the_end_and_reads_gzip(tmp_path):
    lines = [f"line {i}\n" for i in range(40)]
    with gzip.open(tmp_path / "a.tokens.gz", "wt", encoding="utf-8") as f:
        f.writelines(lines)
    raw = load_text(train_file=[str(tmp_path / "a.tokens.gz")], validation_split_percentage=10)
    assert raw["train"]["text"] == lines[:36] and raw["validation"]["text"] == lines[36:]  # line breaks kept
    write(tmp_path / "b.txt", "x y\n")
    both = load_text(train_file=[str(tmp_path / "a.tokens.gz")], validation_file=[str(tmp_path / "b.txt")])
    assert both["train"].num_rows == 40 and both["validation"]["text"] == ["x y\n"]
    with pytest.raises(ValueError, match=r"--validation_split_percentage must be an int in \[1, 99\]"):
        load_text(train_file=[str(tmp_path / "b.txt")], validation_split_percentage=0)


def test_load_text_dataset_folder_by_name(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.txt", "".join(f"{i}\n" for i in range(20)))
    raw = load_text(dataset_name=str(folder), validation_split_percentage=25, cache_dir=str(tmp_path / "cache"))
    assert raw["train"]["text"] == [str(i) for i in range(15)]  # no split in the folder: the last 25 % held out
    assert raw["validation"]["text"] == [str(i) for i in range(15, 20)]
    assert any((tmp_path / "cache").iterdir())  # --cache_dir reaches load_dataset


@pytest.mark.parametrize(
    "files, match",
    [(["a.docx"], "unsupported extension"), (["a.txt", "b.csv"], "same format"), (["a"], "unsupported extension")],
    ids=["docx", "mixed", "none"],
)
def test_file_builder_errors(files, match):
    with pytest.raises(ValueError, match=rf"--train_file: .*{match}"):
        file_builder(files, "--train_file")


@pytest.mark.parametrize("num_proc", [None, 2], ids=["1-process", "2-processes"])
def test_group_texts_concatenates_and_cuts(tokenizer_dir, num_proc):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    lines = synthetic_lines(30)
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": lines})})
    blocks = group_texts(raw, tokenizer, 16, causal=True, num_proc=num_proc)["train"]
    # datasets.map with num_proc shards contiguous rows; each shard drops its own remainder
    shards = [lines] if num_proc is None else [lines[:15], lines[15:]]
    expected = []
    for shard in shards:
        stream = list(chain.from_iterable(tokenizer(line)["input_ids"] for line in shard))
        expected += [stream[i : i + 16] for i in range(0, len(stream) // 16 * 16, 16)]
    assert blocks["input_ids"] == expected and blocks["labels"] == expected


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


def test_word_tokenizer_recipe(tmp_path, text_file):
    recipe("word_tokenizer").main([str(text_file), "--output_dir", str(tmp_path)])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert set(tokenizer.get_vocab()) == {*POSITIVE, *NEGATIVE, *FILLER, "<pad>", "<unk>", "<eos>", "<mask>"}


# ---------------------------------------------------------------- recipes end to end


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_classification_recipe_trains_patched_model_with_warmup(tmp_path, sst2_dir, tokenizer_dir):
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task", "sst2", "--data_dir", str(sst2_dir),
            "--sparsity", "0.5", "--sparsity_warmup_steps", "2", "--max_steps", "4", "--logging_steps", "2",
            "--per_device_train_batch_size", "8", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("classification").main(argv)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hf_sparse_attn"]["sparsity"] == 0.5  # warm-up finished: the target, in the user's form
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    logs = [e for e in log_history(tmp_path) if "loss" in e]
    assert [e["step"] for e in logs] == [2, 4] and all("sparsity/layer_1" in e for e in logs)
    # step 2 measures the rate of the 2nd step (r = 0.25), step 4 the target: more zeros
    assert logs[0]["sparsity/mean"] < logs[1]["sparsity/mean"]

    # the reported accuracy is that of the saved model on the dev file
    model = hf_sparse_attn.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    dev = sst2_rows(16, 2)
    with torch.no_grad():
        batch = tokenizer([s for s, _ in dev], padding=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(p == label for p, (_, label) in zip(predicted, dev, strict=True)) / len(dev)
    assert metrics["eval_accuracy"] == accuracy


def test_classification_recipe_hub_name_predict_and_json_arguments(tmp_path, hub_glue_folder, tokenizer_dir):
    """``--task_name sst2 --dataset_name <Hub-style folder>`` from a JSON argument file, with ``--do_predict``."""
    args = {
        "model_type": "bert",
        "config_overrides": TINY_BERT.split()[3],
        "tokenizer_name": str(tokenizer_dir),
        "task_name": "sst2",
        "dataset_name": str(hub_glue_folder),
        "max_seq_length": 16,
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "do_train": True,
        "do_predict": True,
    }
    path = write(tmp_path / "args.json", json.dumps(args))
    metrics = recipe("classification").main([str(path)])
    assert metrics == {}  # no --do_eval, no evaluation
    lines = (tmp_path / "out" / "predict_results_sst2.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 5
    assert [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2", "3", "4"]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_classification_recipe_regression_and_nan_label(tmp_path, tokenizer_dir):
    rng = random.Random(2)
    folder = tmp_path / "STS-B"
    folder.mkdir()
    for split in ("train", "dev"):
        rows = ["\t".join(["0", "g", "f", "y", "o", "s", "s", sentence(rng, POSITIVE), sentence(rng, NEGATIVE),
                           f"{rng.uniform(0, 5):.3f}"]) for _ in range(12)]  # fmt: skip
        write(folder / f"{split}.tsv", "header\n" + "\n".join(rows) + "\n")
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task_name", "stsb", "--data_dir",
            str(folder), "--sparsity", "0.5", "--max_steps", "2", *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("classification").main(argv)
    assert {"eval_pearson", "eval_spearmanr"} <= set(metrics)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["problem_type"] == "regression"

    lines = (folder / "train.tsv").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\tnan"  # STS-B's "nan": line 6 of the file
    write(folder / "train.tsv", "\n".join(lines) + "\n")
    argv[argv.index(str(tmp_path / "out"))] = str(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"STS-B/train\.tsv:6: label 'nan' is not a finite number"):
        recipe("classification").main(argv)
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_classification_recipe_resumes_from_last_checkpoint(tmp_path, sst2_dir, tokenizer_dir):
    base = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--task_name", "sst2", "--data_dir",
            str(sst2_dir), "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--logging_steps", "1",
            "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "0", "--learning_rate", "1e-3", "--do_train", "--save_strategy", "steps",
            "--save_steps", "2"]  # fmt: skip
    recipe("classification").main([*base, "--max_steps", "2"])
    first_run = [e["loss"] for e in log_history(tmp_path) if "loss" in e]
    recipe("classification").main([*base, "--max_steps", "4"])  # same output_dir: continues from checkpoint-2
    history = [e for e in log_history(tmp_path) if "loss" in e]
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert [e["loss"] for e in history[:2]] == first_run  # steps 1-2 come from the checkpoint, not a new run
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_classification_recipe_real_rte_minilm(tmp_path, shared_data, minilm_path):
    argv = ["--model_name_or_path", minilm_path, "--task_name", "rte", "--data_dir", str(shared_data / "glue"),
            "--max_train_samples", "8", "--max_eval_samples", "8", "--max_predict_samples", "4",
            "--max_seq_length", "32", "--max_steps", "1", "--per_device_train_batch_size", "4", "--sparsity", "0.5",
            "--do_predict", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("classification").main(argv)
    assert metrics["eval_samples_per_second"] > 0 and "eval_accuracy" in metrics
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["hf_sparse_attn"]["sparsity"] == 0.5
    rows = (tmp_path / "predict_results_rte.txt").read_text().splitlines()[1:]
    assert len(rows) == 4 and {r.split("\t")[1] for r in rows} <= {"entailment", "not_entailment"}


def heldout_blocks(lines: list[str], tokenizer, percentage: int, block_size: int, count: int) -> torch.Tensor:
    """The evaluation blocks the LM recipes build, computed here by hand: the last ``percentage`` % of the lines,
    tokenised line by line, concatenated, cut into blocks."""
    held_out = lines[len(lines) - round(len(lines) * percentage / 100) :]
    stream = list(chain.from_iterable(tokenizer(line)["input_ids"] for line in held_out))
    return torch.tensor([stream[i : i + block_size] for i in range(0, block_size * count, block_size)])


def test_causal_lm_recipe_head_and_perplexity(tmp_path, text_file, tokenizer_dir):
    argv = [*TINY_GPT2.split(), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(text_file),
            "--validation_split_percentage", "10", "--block_size", "16", "--max_eval_samples", "4",
            "--per_device_eval_batch_size", "3", "--head", "moss", "--num_mixtures", "2", "--sparsity", "0.3",
            "--sparsity_warmup_steps", "2", "--max_steps", "4", "--logging_steps", "1",
            *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    losses = [e["loss"] for e in log_history(tmp_path) if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)

    # the checkpoint comes back patched, with the trained head; perplexity = exp(mean NLL of every predicted token)
    model = hf_sparse_attn.from_pretrained(tmp_path).eval()
    assert isinstance(model.lm_head, MixtureHead) and model.lm_head.head_name == "moss"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = heldout_blocks(synthetic_lines(), tokenizer, 10, 16, 4)
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
    nll = -log_probs.gather(-1, ids[:, 1:, None]).mean()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    # batches of 3 + 1 blocks: eval_loss weighs each block equally, which with equal blocks is the token mean too
    assert metrics["eval_loss"] == pytest.approx(float(nll), rel=1e-5)

    # --do_eval alone on the saved checkpoint: loaded patched, the same numbers
    again = recipe("causal_lm").main(["--model_name_or_path", str(tmp_path), "--train_file", str(text_file),
                                      "--validation_split_percentage", "10", "--block_size", "16",
                                      "--max_eval_samples", "4", "--output_dir", str(tmp_path / "eval"), "--use_cpu",
                                      "--report_to", "none", "--do_eval"])  # fmt: skip
    assert again["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-5)


def test_causal_lm_recipe_dataset_name_and_workers(tmp_path, tokenizer_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.txt", "".join(synthetic_lines(120)))
    argv = [*TINY_GPT2.split(), "--tokenizer_name", str(tokenizer_dir), "--dataset_name", str(folder),
            "--cache_dir", str(tmp_path / "cache"), "--preprocessing_num_workers", "2", "--block_size", "16",
            "--max_steps", "1", *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    assert math.isfinite(metrics["eval_perplexity"]) and metrics["eval_perplexity"] > 1
    assert any((tmp_path / "cache").iterdir())


def test_causal_lm_recipe_real_ptb(tmp_path, shared_data):
    ptb = shared_data / "ptb"
    lines = datasets.load_dataset("text", data_files=str(ptb / "ptb.valid.txt.gz"), split="train")["text"]
    word_level_tokenizer(lines).save_pretrained(tmp_path / "tok")
    argv = [*TINY_GPT2.split(), "--tokenizer_name", str(tmp_path / "tok"),
            "--train_file", str(ptb / "ptb.valid.txt.gz"), "--validation_file", str(ptb / "ptb.test.txt.gz"),
            "--block_size", "32", "--max_train_samples", "16", "--max_eval_samples", "8", "--head", "plif",
            "--num_knots", "100", "--sparsity", "0.5", "--max_steps", "2", *common_args(tmp_path / "out")]  # fmt: skip
    metrics = recipe("causal_lm").main(argv)
    # an untrained model is close to uniform over the vocabulary
    assert len(lines) == 3370 and 0.5 * 10002 < metrics["eval_perplexity"] < 2 * 10002
    assert isinstance(hf_sparse_attn.from_pretrained(tmp_path / "out").lm_head, MonotonicHead)


def test_masked_lm_recipe_per_layer_sparsity(tmp_path, text_file, tokenizer_dir):
    argv = [*TINY_BERT.split(), "--tokenizer_name", str(tokenizer_dir), "--train_file", str(text_file),
            "--max_seq_length", "16", "--max_eval_samples", "4", "--head", "plif", "--num_knots", "50",
            "--sparsity", "none,0.5", "--max_steps", "2", "--logging_steps", "1", *common_args(tmp_path)]  # fmt: skip
    metrics = recipe("masked_lm").main(argv)
    vocabulary = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    assert 1 < metrics["eval_perplexity"] < 2 * vocabulary  # a barely trained model: near uniform at most
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
    ids = heldout_blocks(synthetic_lines(), tokenizer, 5, 16, 4)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) == pytest.approx(metrics["eval_loss"], rel=1e-5)

    # the one-call reload: hf_sparse_attn.from_pretrained of the adapter folder does the above
    again = hf_sparse_attn.from_pretrained(out).eval()
    assert isinstance(again, PeftModel) and hf_sparse_attn.get_patch_config(again).head == "plif"
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, labels=ids).loss, loss, rtol=0, atol=0)
