"""Sliding-window perplexity against NLL computed token by token with each token's own context window."""

from __future__ import annotations

import doctest
import gzip
import json
import math

import pytest
import torch
import transformers
from conftest import tiny_model, word_tokenizer

import hf_sparse_attn
from hf_sparse_attn.commands import cli
from hf_sparse_attn.training import perplexity as perplexity_module
from hf_sparse_attn.training.perplexity import load_eval_text, perplexity, sliding_windows

POSITIONS = 64


def tiny_lm(head: str | None = None) -> transformers.GPT2LMHeadModel:
    model = tiny_model(transformers.GPT2LMHeadModel, n_positions=POSITIONS)
    return hf_sparse_attn.patch_model(model, head=head) if head else model


@pytest.fixture
def text_file(tmp_path):
    words = torch.randint(3, 99, (40,), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"w{i}" for i in words.tolist()[:20]) + "\n" + " ".join(f"w{i}" for i in words[20:]))
    return path


@torch.no_grad()
def nll_with_context(model, ids: torch.Tensor, position: int, context_start: int) -> float:
    """-log p(ids[position] | ids[context_start:position]) from one forward pass on exactly that context."""
    log_probs = model(ids[None, context_start:position]).logits[0, -1].log_softmax(-1)
    return -log_probs[ids[position]].item()


@pytest.mark.parametrize("head", [None, "mos", "plif"], ids=["softmax", "mos", "plif"])
def test_single_window_is_exp_mean_nll(text_file, head):
    model, tokenizer = tiny_lm(head), word_tokenizer()
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"])
    result = perplexity(model, tokenizer, text_file, progress=False)
    with torch.no_grad():
        log_probs = model(ids[None]).logits[0, :-1].log_softmax(-1)
    nll = -log_probs.gather(-1, ids[1:, None]).mean().item()
    assert result["num_tokens"] == len(ids) - 1 and result["num_windows"] == 1
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("enabled", [True, False], ids=["bars-enabled", "bars-disabled"])
def test_progress_bar_obeys_transformers_switch(text_file, capsys, enabled):
    """The bar goes through transformers' tqdm: ``disable_progress_bar()`` silences it (the enabled case shows the
    bar does write to stderr otherwise)."""
    bars = transformers.utils.logging
    was_enabled = bars.is_progress_bar_enabled()
    (bars.enable_progress_bar if enabled else bars.disable_progress_bar)()
    try:
        capsys.readouterr()
        perplexity(tiny_lm(), word_tokenizer(), text_file, max_length=16, stride=8, progress=True)
        stderr = capsys.readouterr().err
    finally:
        (bars.enable_progress_bar if was_enabled else bars.disable_progress_bar)()
    assert ("perplexity" in stderr) == enabled, stderr


@pytest.mark.parametrize(("max_length", "stride"), [(8, 3), (8, 1), (6, 6)], ids=["L8-s3", "L8-s1", "L6-s6"])
def test_strided_windows_score_each_token_once_with_its_window_context(text_file, max_length, stride):
    model, tokenizer = tiny_lm(), word_tokenizer()
    ids = torch.tensor(tokenizer(text_file.read_text())["input_ids"])
    nlls = []
    for position in range(1, len(ids)):
        # the first window [b, b + max_length) that contains the position, with b a multiple of the stride
        start = math.ceil(max(0, position - max_length + 1) / stride) * stride
        if start < position:  # a token at a window's first position has no context and is not scored
            nlls.append(nll_with_context(model, ids, position, start))
    result = perplexity(model, tokenizer, text_file, max_length=max_length, stride=stride, progress=False)
    assert result["num_tokens"] == len(nlls)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_batching_and_gzip_do_not_change_the_result(text_file, tmp_path):
    model, tokenizer = tiny_lm("moss"), word_tokenizer()
    gz = tmp_path / "text.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(text_file.read_text())
    one = perplexity(model, tokenizer, text_file, max_length=16, stride=5, batch_size=1, progress=False)
    batched = perplexity(model, tokenizer, gz, max_length=16, stride=5, batch_size=3, progress=False)
    assert batched["num_tokens"] == one["num_tokens"]
    assert batched["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_text_sources_give_the_same_result(text_file, tmp_path):
    """A file is scored as one document; a dataset (Hub name or folder) split is its rows joined by blank lines."""
    model, tokenizer = tiny_lm("plif"), word_tokenizer()
    lines = text_file.read_text().splitlines()
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "test.txt").write_text("\n".join(lines) + "\n")  # the text builder: one row per line
    joined = load_eval_text(dataset_name=str(folder), split="test")
    assert joined == "\n\n".join(lines)
    assert load_eval_text(text_file) == text_file.read_text()
    from_file = perplexity(model, tokenizer, text_file, max_length=16, stride=8, progress=False)
    from_text = perplexity(model, tokenizer, text=text_file.read_text(), max_length=16, stride=8, progress=False)
    assert from_text == {
        **from_file,
        "seconds": from_text["seconds"],
        "tokens_per_second": from_text["tokens_per_second"],
    }
    with pytest.raises(ValueError, match="exactly one of --file"):
        load_eval_text(text_file, dataset_name=str(folder))
    with pytest.raises(ValueError, match="--text-column: .* has no column 'body'"):
        load_eval_text(dataset_name=str(folder), split="test", text_column="body")
    with pytest.raises(ValueError, match="exactly one of text_path and text"):
        perplexity(model, tokenizer, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 1}, "max_length must be an int in"),
        ({"max_length": POSITIONS + 1}, "max_length must be an int in"),
        ({"max_length": 8, "stride": 9}, r"stride must be an int in \[1, max_length=8\]"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
    ],
    ids=["length-1", "length-too-long", "stride-too-long", "batch-0"],
)
def test_bad_arguments(text_file, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(tiny_lm(), word_tokenizer(), text_file, progress=False, **kwargs)


def test_rejects_a_masked_lm(text_file):
    with pytest.raises(ValueError, match="model must be a causal language model"):
        perplexity(tiny_model(transformers.BertForMaskedLM), word_tokenizer(), text_file, progress=False)


def test_eval_ppl_command_loads_a_patched_checkpoint(text_file, tmp_path, capsys):
    model, tokenizer = tiny_lm("plif"), word_tokenizer()
    with torch.no_grad():
        model.lm_head.extra.theta.normal_()  # a trained-looking transform: the checkpoint must bring it back
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    output = tmp_path / "ppl.json"
    argv = ["eval-ppl", "--model", str(tmp_path / "ckpt"), "--file", str(text_file), "--output", str(output)]
    argv += ["--max-length", "16", "--stride", "8", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 0
    expected = perplexity(model, tokenizer, text_file, max_length=16, stride=8, progress=False)
    written = json.loads(output.read_text())
    assert written["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert f"perplexity {expected['perplexity']:.3f}" in capsys.readouterr().out

    folder = tmp_path / "dataset"  # --dataset-name: a Hub dataset, or a local dataset folder as here
    folder.mkdir()
    (folder / "test.txt").write_text(text_file.read_text())
    argv = ["eval-ppl", "--model", str(tmp_path / "ckpt"), "--dataset-name", str(folder), "--max-length", "16",
            "--stride", "8", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    text = "\n\n".join(text_file.read_text().splitlines())
    expected = perplexity(model, tokenizer, text=text, max_length=16, stride=8, progress=False)
    assert f"{folder} test: perplexity {expected['perplexity']:.3f}" in capsys.readouterr().out


def test_wikitext2_slice(shared_data, tmp_path):
    source = shared_data / "wikitext-2" / "wiki.valid.tokens.gz"
    if not source.exists():
        pytest.skip(f"{source} not found")
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(40)]
    words = sorted({word for line in lines for word in line.split()} - {"<unk>"})
    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(words)}}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_word_level(vocab), unk_token="<unk>", pad_token="<unk>"
    )
    path = tmp_path / "slice.tokens.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    model = hf_sparse_attn.patch_model(
        tiny_model(transformers.GPT2LMHeadModel, n_positions=POSITIONS, vocab_size=len(vocab)), head="mos"
    )
    num_ids = len(tokenizer("".join(lines))["input_ids"])
    result = perplexity(model, tokenizer, path, max_length=POSITIONS, stride=32, batch_size=4, progress=False)
    assert result["num_tokens"] == num_ids - 1 and num_ids > 1000
    # an untrained model is close to uniform over the slice's vocabulary
    assert 0.5 * len(vocab) < result["perplexity"] < 2 * len(vocab)


def _word_level(vocab: dict[str, int]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_docstring_examples():
    examples = doctest.DocTestFinder().find(sliding_windows, globs=vars(perplexity_module))
    results = [doctest.DocTestRunner().run(example) for example in examples]
    assert sum(r.attempted for r in results) > 0 and sum(r.failed for r in results) == 0
