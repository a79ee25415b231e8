"""The reproduction drivers (benchmarks/reproduce/) on tiny grids: real recipes, tiny models, a few steps.

Checked: one JSON per finished run with its metrics and learning curve, finished runs skipped on restart, the
first seed's checkpoint kept and the others' deleted, the fine-tuning row refusing to start without its origin, and
the summariser's tables (numbers recomputed here from the JSON) and plots; ``--jobs`` (concurrent runs, the
fine-tuning row after its origin, a failure stopping only its run and the runs that start from it), the claims that
keep drivers sharing a folder from training a run twice, and ``--device``.
"""

from __future__ import annotations

import argparse
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


def test_lm_grid_defaults_give_each_corpus_its_epochs(tmp_path: Path) -> None:
    from benchmarks.reproduce import lm_heads, runner

    def grid(*options: str) -> dict[str, runner.Run]:
        parser = lm_heads.parser()
        runner.add_arguments(parser)
        args = parser.parse_args(["--data-dir", str(tmp_path), "--checkpoint-dir", str(tmp_path), *options])
        return {run.name: run for run in lm_heads.build(args)}

    runs = grid()
    ptb, wt2, finetune = runs["ptb-mos-seed2"], runs["wt2-mos-seed0"], runs["ptb-finetune-mos-seed0"]
    assert (ptb.config["epochs"], wt2.config["epochs"], finetune.config["epochs"]) == (6.0, 2.0, 2.0)
    steps_per_epoch = {"ptb": -(-(929_589 // 128) // 32), "wt2": -(-(2_088_628 // 128) // 32)}  # MANIFEST tokens
    assert (ptb.steps, wt2.steps) == (6 * steps_per_epoch["ptb"], 2 * steps_per_epoch["wt2"])
    assert "wt2-mos-seed1" not in runs  # WikiText-2: the first seed only
    assert {run.config["epochs"] for name, run in grid("--epochs", "3").items() if "finetune" not in name} == {3.0}
    with pytest.raises(ValueError, match=r"--epochs must be > 0 \(or left out: PTB 6, WikiText-2 2\); got 0.0"):
        grid("--epochs", "0")  # not the default: 0 is no number of epochs


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
        f"<!-- reproduce:{k} -->\nold\n<!-- /reproduce:{k} -->\n"
        for k in ("glue", "lm_heads", "finetune", "calibration")
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


def _record(table: str, setting: str, seed: int, accuracy: float, runtime: float, **config: object) -> dict:
    """A finished run's JSON as the runner writes it (the fields the summariser reads)."""
    return {"table": table, "setting": setting, "seed": seed, "name": f"{setting.replace('/', '-')}-seed{seed}",
            "config": config, "metrics": {"eval": {"eval_accuracy": accuracy}}, "steps": 10, "resumed": False,
            "train": {"train_runtime": runtime}, "cpu_seconds": 2 * runtime, "checkpoint": None,
            "log_history": [{"sparsity/mean": 0.5, "step": 10}, {"eval_runtime": 1.0, "step": 10}]}  # fmt: skip


def _report(rates: list, output_change: float) -> dict:
    """A CalibrationReport's JSON for a 2-layer, 2-head model."""
    heads = [[r, r] if not isinstance(r, list) else r for r in rates]
    zeros = [[0.0 if r is None else r for r in row] for row in heads]
    return {"model_type": "bert", "causal": False, "measure": "hidden", "rates": rates, "head_rates": heads,
            "zero_fraction": zeros, "attention_error": [[1e-3, 2e-3], [0.0, 4e-3]], "output_change": output_change,
            "output_change_se": 0.01, "num_sentences": 8, "granularity": "head", "budget": None,
            "target_sparsity": 0.5, "forward_passes": 4, "mean_sparsity": sum(map(sum, zeros)) / 4}  # fmt: skip


def test_summariser_calibration_table_pairs_seeds_and_draws_the_map(tmp_path: Path) -> None:
    from benchmarks.reproduce import calibration, summarise

    settings = {"task": "sst2", "sentences": 8}
    results = tmp_path / "results"
    for table in ("glue", "calibration"):
        (results / table).mkdir(parents=True)
    uniform = {0: 0.80, 1: 0.84, 2: 0.82}  # seed -> dev accuracy; seed 2 has no calibrated twin yet
    calibrated = {0: 0.83, 1: 0.85}
    for seed, accuracy in uniform.items():
        record = _record("glue", "sst2/r=0.5", seed, accuracy, runtime=21.0)
        (results / "glue" / f"{record['name']}.json").write_text(json.dumps(record))
    checkpoint = tmp_path / "calibrated-seed0"
    _tiny_patched_bert([[0.7, 0.3], None]).save_pretrained(checkpoint)
    for seed, accuracy in calibrated.items():
        record = _record("calibration", "sst2/calibrated", seed, accuracy, runtime=31.0, calibration=settings)
        record["checkpoint"] = str(checkpoint) if seed == 0 else None
        (results / "calibration" / f"{record['name']}.json").write_text(json.dumps(record))
    calibrated_map = {"settings": settings, "uniform": _report([0.5, 0.5], 0.30),
                      "calibrated": _report([[0.7, 0.3], None], 0.20)}  # fmt: skip
    (results / "calibration" / f"{calibration.MAP_PREFIX}sst2-x.json").write_text(json.dumps(calibrated_map))

    doc = tmp_path / "results.md"
    markers = "".join(
        f"<!-- reproduce:{k} -->\n<!-- /reproduce:{k} -->\n" for k in ("glue", "lm_heads", "finetune", "calibration")
    )
    doc.write_text(markers)
    text = summarise.summarise(results, doc, tmp_path / "images")
    differences = [calibrated[s] - uniform[s] for s in (0, 1)]
    uniform_row = (f"| sst2 | r = 0.5 everywhere | 0.500 | 0.300 ± 0.010 | 0.500 | accuracy | "
                   f"{statistics.mean(uniform.values()):.4f} ± {statistics.stdev(uniform.values()):.4f} | — | "
                   "1.00× | 3 |")  # fmt: skip
    calibrated_row = (
        f"| sst2 | calibrated per head | 0.250 | 0.200 ± 0.010 | 0.500 | accuracy | "
        f"{statistics.mean(calibrated.values()):.4f} ± {statistics.stdev(calibrated.values()):.4f} | "
        f"{statistics.mean(differences):.4f} ± {statistics.stdev(differences):.4f} (2 paired) | "
        f"{31 / 21:.2f}× | 2 |"
    )  # fmt: skip  (CPU time: whole runs, evaluations included)
    assert uniform_row in text and calibrated_row in text
    image = tmp_path / "images" / summarise.CALIBRATION_PLOT.format(task="sst2")
    assert image.read_bytes().startswith(PNG_MAGIC)
    assert f"(images/{image.name})" in text
    assert summarise.summarise(results, doc, tmp_path / "images") == text  # idempotent

    # the calibrated setting's card carries its map: the rate table and the heat map beside the card
    (card,) = summarise.render_cards(results, tmp_path / "cards")
    assert card.parent.name == "minilm-sst2-calibrated"
    text = card.read_text()
    assert (
        "## Calibrated sparsity" in text
        and "| 0 | 0.70 | 0.30 | 0.500 |" in text
        and "| 1 | softmax | softmax |" in text
    )
    assert (card.parent / "calibration.png").read_bytes().startswith(PNG_MAGIC)


def _tiny_patched_bert(rates: list):
    from transformers import BertConfig, BertForSequenceClassification

    import hf_sparse_attn

    config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16)  # fmt: skip
    return hf_sparse_attn.patch_model(BertForSequenceClassification(config), sparsity=rates)


# --jobs, claims and --device: recipe subprocesses (as a real driver runs them) on the tiny LM grid, without its
# test-set evaluations (one more subprocess per run; the scheduling, not the evaluation, is tested here)


def jobs_argv(data: Path, tmp_path: Path, jobs: int) -> list[str]:
    return [*(a for a in lm_argv(data, tmp_path) if a != "--in-process"), "--jobs", str(jobs)]


def lm_grid(broken: str | None = None):
    """``lm_heads.build`` without the evaluations; ``broken``: the run given an option its recipe rejects."""
    import dataclasses

    from benchmarks.reproduce import lm_heads

    def build(args):
        runs = [dataclasses.replace(run, evaluations=()) for run in lm_heads.build(args)]
        return [dataclasses.replace(r, argv=(*r.argv, "--no_such_option")) if r.name == broken else r for r in runs]

    return build


def dead_pid() -> int:
    """The pid of a process that has exited (a driver killed while it held a claim)."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_jobs_run_concurrently_and_start_the_finetune_row_after_its_origin(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import socket

    from benchmarks.reproduce import lm_heads, runner

    parser = lm_heads.parser()
    runner.add_arguments(parser)
    args = parser.parse_args(jobs_argv(tiny_corpus, tmp_path, 2))
    grid = {run.name: run for run in lm_grid()(args)}
    # a driver killed while it trained ptb-mos-seed0 left its claim: stale, so it is taken over
    stale = runner.claim_path(grid["ptb-mos-seed0"], args.checkpoint_dir)
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))

    status = runner.main(lm_grid(), lm_heads.parser(), jobs_argv(tiny_corpus, tmp_path, 2), prepare=lm_heads.prepare)
    assert status == 0
    out = capsys.readouterr().out.splitlines()
    results = tmp_path / "results" / "lm_heads"
    # the files a serial run writes: one per run of the grid, named by its hash
    assert sorted(p.name for p in results.glob("*.json")) == sorted(
        r.result_path(args.results_dir).name for r in grid.values()
    )
    started = {line.split()[1]: i for i, line in enumerate(out) if line.startswith("run ")}
    ended = {line.split()[1].rstrip(":"): i for i, line in enumerate(out) if line.startswith("done ")}
    assert started["lm_heads/ptb-mos-seed0"] < ended["lm_heads/ptb-softmax-seed0"]  # two at once
    for head in ("softmax", "mos"):
        assert started[f"lm_heads/ptb-finetune-{head}-seed0"] > ended["lm_heads/ptb-softmax-seed0"]
    assert f"taking over {stale} (pid" in "\n".join(out)
    folder = tmp_path / "ckpt" / "lm_heads"
    assert not list(folder.glob("*.claim*"))  # every claim released, no temporary file left
    for run in grid.values():
        record = json.loads(run.result_path(args.results_dir).read_text())
        assert record["machine"]["device"] == "cpu" and record["machine"]["jobs"] == 2
        assert "--use_cpu" in record["argv"] and record["cpu_seconds"] > 0
        assert "train_runtime" in runner.log_path(run, args.checkpoint_dir).read_text()  # its recipe's output
    finetune = json.loads(grid["ptb-finetune-mos-seed0"].result_path(args.results_dir).read_text())
    origin = json.loads(grid["ptb-softmax-seed0"].result_path(args.results_dir).read_text())
    assert finetune["finished"] >= origin["finished"]


def test_jobs_a_failed_run_stops_only_itself_and_the_runs_that_start_from_it(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from benchmarks.reproduce import lm_heads, runner

    argv = jobs_argv(tiny_corpus, tmp_path, 2)
    assert runner.main(lm_grid(broken="ptb-softmax-seed0"), lm_heads.parser(), argv, prepare=lm_heads.prepare) == 1
    out = capsys.readouterr().out
    assert "FAILED lm_heads/ptb-softmax-seed0: recipes/causal_lm.py exited with status 1" in out
    assert "--no_such_option" in out  # the end of its log, which says why
    for head in ("softmax", "mos"):
        assert f"not run lm_heads/ptb-finetune-{head}-seed0: its origin ptb-softmax-seed0 did not finish" in out
    summary = "ptb-softmax-seed0 (failed), ptb-finetune-softmax-seed0 (not run), ptb-finetune-mos-seed0 (not run)"
    assert out.splitlines()[-1] == f"3 of 4 runs did not finish: {summary}"
    (result,) = (tmp_path / "results" / "lm_heads").glob("*.json")  # the other run finished
    assert json.loads(result.read_text())["name"] == "ptb-mos-seed0"
    assert not list((tmp_path / "ckpt" / "lm_heads").glob("*.claim*"))


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_run_claimed_by_a_live_driver_is_skipped(
    tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture, jobs: int
) -> None:
    import os
    import socket

    from benchmarks.reproduce import lm_heads, runner

    argv = [*jobs_argv(tiny_corpus, tmp_path, jobs), "--only", "ptb-softmax-seed0"]
    parser = lm_heads.parser()
    runner.add_arguments(parser)
    args = parser.parse_args(argv)
    (run,) = runner.select(lm_heads.build(args), args.only)
    path = runner.claim_path(run, args.checkpoint_dir)
    path.parent.mkdir(parents=True)
    holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})  # this process: alive
    path.write_text(holder)
    assert lm_heads.main(argv) == 0
    out = capsys.readouterr().out
    assert f"skip lm_heads/ptb-softmax-seed0 (claimed by pid {os.getpid()} on {socket.gethostname()}: {path})" in out
    assert path.read_text() == holder and not (tmp_path / "results").exists()
    assert not (tmp_path / "ckpt" / "lm_heads" / "tokenizer-ptb").exists()  # nothing started, nothing prepared


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_prepare_releases_the_claim_of_the_run_it_was_for(
    tiny_corpus: Path, tmp_path: Path, jobs: int
) -> None:
    from benchmarks.reproduce import lm_heads, runner

    def prepare(args: argparse.Namespace) -> None:
        raise RuntimeError("the tokenizer could not be built")

    with pytest.raises(RuntimeError, match="the tokenizer could not be built"):
        runner.main(lm_grid(), lm_heads.parser(), jobs_argv(tiny_corpus, tmp_path, jobs), prepare=prepare)
    folder = tmp_path / "ckpt" / "lm_heads"
    assert folder.is_dir() and not list(folder.glob("*.claim*"))  # the first run was claimed, then released


def test_claim_is_exclusive_and_takes_over_a_dead_drivers_claim(tmp_path: Path) -> None:
    import os
    import socket

    from benchmarks.reproduce.runner import claim

    path = tmp_path / "run.claim"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    assert claim(path) is None and json.loads(path.read_text()) == me
    assert claim(path) == me  # held (by a live process): a second claim fails, even this process's own
    path.write_text(json.dumps({"host": me["host"], "pid": dead_pid()}))
    assert claim(path) is None and json.loads(path.read_text()) == me
    elsewhere = {"host": f"not-{me['host']}", "pid": dead_pid()}  # another host's pid cannot be checked here
    path.write_text(json.dumps(elsewhere))
    assert claim(path) == elsewhere
    assert [p.name for p in tmp_path.iterdir()] == ["run.claim"]
    for broken in ("", json.dumps({"host": me["host"]}), json.dumps([me["host"], me["pid"]])):  # no pid to check
        path.write_text(broken)
        with pytest.raises(ValueError, match="run.claim is not a claim"):
            claim(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--jobs", "0"], "--jobs must be >= 1; got 0"),
        (["--jobs", "2", "--in-process"], "--jobs 2 with --in-process"),
    ],
)
def test_jobs_bad_values_are_errors(tiny_corpus: Path, tmp_path: Path, options: list[str], message: str) -> None:
    from benchmarks.reproduce import lm_heads

    with pytest.raises(ValueError, match=message):
        lm_heads.main([*jobs_argv(tiny_corpus, tmp_path, 1), *options])
    assert not (tmp_path / "ckpt").exists()


def test_device_cuda_without_a_gpu_is_an_error_at_start(tiny_corpus: Path, tmp_path: Path) -> None:
    import torch

    from benchmarks.reproduce import lm_heads

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match=r"--device cuda: torch .* sees no GPU here .* use --device cpu"):
        lm_heads.main([*lm_argv(tiny_corpus, tmp_path), "--device", "cuda"])
    assert not (tmp_path / "ckpt").exists()
    assert lm_heads.main([*lm_argv(tiny_corpus, tmp_path), "--device", "cuda", "--dry-run"]) == 0  # trains nothing


def test_device_and_jobs_leave_the_grid_and_drop_use_cpu_on_cuda(
    tiny_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.reproduce import lm_heads, runner

    def grid(*options: str) -> tuple[argparse.Namespace, list[runner.Run]]:
        parser = lm_heads.parser()
        runner.add_arguments(parser)
        args = parser.parse_args([*lm_argv(tiny_corpus, tmp_path), *options])
        return args, lm_heads.build(args)

    cpu_args, cpu = grid()
    cuda_args, cuda = grid("--device", "cuda", "--jobs", "4")
    assert [r.result_path(tmp_path) for r in cuda] == [r.result_path(tmp_path) for r in cpu]  # GPU runs fill it

    calls = []

    def recipe(recipe: str, argv: list[str], **kwargs: object) -> float:
        calls.append(argv)
        raise InterruptedError  # stop after the training call: only its arguments are checked

    monkeypatch.setattr(runner, "call_recipe", recipe)
    for args in (cpu_args, cuda_args):
        with pytest.raises(InterruptedError):
            runner.execute(cpu[0], args)
    on_cpu, on_cuda = calls
    assert "--use_cpu" in on_cpu and [a for a in on_cpu if a != "--use_cpu"] == on_cuda


def test_summariser_time_ratios_compare_runs_of_one_device() -> None:
    from benchmarks.reproduce.summarise import glue_table

    def run(setting: str, seed: int, runtime: float, device: str, jobs: int = 1) -> dict:
        record = _record("glue", setting, seed, 0.5, runtime)
        record["machine"] = {"device": device, "jobs": jobs}
        record["wall_seconds"] = 5 * runtime  # differs from cpu_seconds, so the test sees which one is used
        return record

    # whole-run time: CPU time (2 × runtime in _record) on the CPU, wall time on the GPU
    groups = {
        "rte/softmax": [run("rte/softmax", 0, 11.0, "cpu"), run("rte/softmax", 1, 3.0, "cuda")],
        "rte/r=0.5": [
            run("rte/r=0.5", 0, 13.0, "cpu"),
            run("rte/r=0.5", 1, 4.0, "cuda"),
            run("rte/r=0.5", 2, 40.0, "cuda", jobs=4),
        ],  # shared the GPU: its wall time is left out
        "rte/r=0.25": [run("rte/r=0.25", 0, 2.0, "cuda")],
        "sst2/softmax": [run("sst2/softmax", 0, 11.0, "cpu")],
        "sst2/r=0.5": [run("sst2/r=0.5", 0, 2.0, "cuda")],
    }
    text = glue_table(groups)
    assert f"| {13 / 11:.2f}× cpu, {4 / 3:.2f}× cuda | 3 |" in text  # r=0.5: each device against its own softmax
    assert f"| {2 / 3:.2f}× cuda | 1 |" in text  # r=0.25: the GPU softmax run only
    assert "| — (cuda vs cpu) | 1 |" in text  # sst2: no softmax run on the GPU to compare with
