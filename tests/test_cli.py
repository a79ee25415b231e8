"""``hf-sparse-attn``: fast help, --version, env, both option spellings, ``patch`` (local and pushed to the loopback
Hub of ``tests/hub_server.py``), and one clear line for bad input in every command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import padded_batch, tiny_model, word_tokenizer
from hub_server import HubServer

import hf_sparse_attn
from hf_sparse_attn.commands import cli
from hf_sparse_attn.config import CONFIG_KEY, HEAD_NAMES
from hf_sparse_attn.publishing import hub

# huggingface_hub's LFS upload passes a file object as `data=`, which its HTTP client deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIGHT_COMMANDS = list(cli.COMMANDS)  # every command answers --help without torch or transformers


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``hf-sparse-attn ARGV...`` (argparse exits become statuses)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *parts: str) -> None:
    """Status 2 and one error line (after any progress bars of loading), naming ``parts``, without a traceback."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("hf-sparse-attn")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]) and lines[0].startswith(f"hf-sparse-attn {command}: ")
    assert "Traceback" not in err and all(part in lines[0] for part in parts), err


@pytest.fixture(scope="module")
def base_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain GPT-2 checkpoint with a word-level tokenizer, as a user's local model directory."""
    folder = tmp_path_factory.mktemp("base") / "gpt2"
    tiny_model(transformers.GPT2LMHeadModel).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


# -- the parser -------------------------------------------------------------------------------------------------


def test_help_of_every_light_command_does_not_import_torch_or_transformers() -> None:
    script = (
        "import sys\n"
        "from hf_sparse_attn.commands import cli\n"
        f"for argv in [['--help'], ['--version'], *[[c, '--help'] for c in {LIGHT_COMMANDS!r}]]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code == 0, argv\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "HEAVY []" in done.stdout, done.stdout[-2000:]


def test_import_after_transformers_registers_the_attention_implementation() -> None:
    # the package imports lazily, but a transformers user can name the implementation right after importing it
    script = (
        "import transformers, hf_sparse_attn\n"
        "from transformers import AttentionInterface\n"
        "print('REGISTERED', 'hf_sparse_attn' in AttentionInterface._global_mapping)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert "REGISTERED True" in done.stdout


def test_version(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"hf-sparse-attn {hf_sparse_attn.__version__}"


@pytest.mark.parametrize(
    "command, hyphen, underscore",
    [
        ("demo", ["--output-dir", "x", "--max-steps", "3", "--map-head", "1"], ["--output_dir", "x", "--max_steps", "3",
                                                                              "--map_head", "1"]),
        ("patch", ["m", "--output-dir", "o", "--push-to-hub", "me/r", "--num-mixtures", "2"],
         ["m", "--output_dir", "o", "--push_to_hub", "me/r", "--num_mixtures", "2"]),
        ("push", ["me/r", "dir", "--commit-message", "hi"], ["me/r", "dir", "--commit_message", "hi"]),
    ],
    ids=["demo", "patch", "push"],
)  # fmt: skip
def test_options_accept_both_spellings(command: str, hyphen: list[str], underscore: list[str]) -> None:
    parse = cli.build_parser(command).parse_args
    assert vars(parse([command, *hyphen])) == vars(parse([command, *underscore]))


def test_env_reports_versions(capsys) -> None:
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    assert f"- transformers: {transformers.__version__}" in out
    assert f"- torch: {torch.__version__}" in out
    assert f"- hf-sparse-attn: {hf_sparse_attn.__version__}" in out
    assert "- GPUs: " in out


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, str]:
        raise TypeError("a bug, not bad input")

    monkeypatch.setattr("hf_sparse_attn.commands.env.collect_env", broken)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["env"])


def test_wrapped_input_error_gives_one_line_with_its_cause(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def wrapped() -> dict[str, str]:
        try:
            b"\xff".decode()
        except UnicodeDecodeError as err:
            raise RuntimeError("An error occurred while generating the dataset") from err

    monkeypatch.setattr("hf_sparse_attn.commands.env.collect_env", wrapped)
    code, _, err = run_cli(capsys, "env")
    assert_one_line_error(code, err, "env", "generating the dataset; caused by UnicodeDecodeError: 'utf-8' codec")


# -- patch -----------------------------------------------------------------------------------------------------


def test_patch_help_names_every_head(capsys) -> None:
    code, out, _ = run_cli(capsys, "patch", "--help")
    assert code == 0
    assert all(name in out for name in HEAD_NAMES if name != "softmax")


def test_patch_writes_a_patched_checkpoint_with_its_card(capsys, base_gpt2: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "patched"
    argv = ["patch", str(base_gpt2), "--sparsity", "none,0.5", "--head", "moss", "--num-mixtures", "2",
            "--output-dir", str(out_dir)]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert str(out_dir) in out

    again = hf_sparse_attn.from_pretrained(out_dir).eval()
    config = hf_sparse_attn.get_patch_config(again)
    assert (config.sparsity, config.head, config.num_mixtures) == ([None, 0.5], "moss", 2)
    base = transformers.GPT2LMHeadModel.from_pretrained(base_gpt2).state_dict()
    patched = again.state_dict()
    assert all(torch.equal(patched[name], value) for name, value in base.items())  # only the head is new
    card = (out_dir / "README.md").read_text()
    assert card.count(hub.SECTION_START) == 1 and "| 1 | r-softmax | 0.5 |" in card and "| 0 | softmax |" in card
    assert transformers.AutoTokenizer.from_pretrained(out_dir).get_vocab() == word_tokenizer().get_vocab()


@pytest.mark.parametrize(
    "options, parts",
    [
        (["--sparsity", "1.5"], ["sparsity"]),
        (["--sparsity", "0.5,"], ["--sparsity", "empty"]),
        (["--head", "softer"], ["head", "'moss'"]),
        (["--task", "sequence-classification", "--head", "moss"], ["needs a model with an LM head"]),
    ],
    ids=["rate-above-1", "trailing-comma", "unknown-head", "head-without-lm-head"],
)
def test_patch_bad_options_give_one_line(capsys, base_gpt2: Path, tmp_path: Path, options, parts) -> None:
    code, _, err = run_cli(capsys, "patch", str(base_gpt2), "--output-dir", str(tmp_path / "o"), *options)
    assert_one_line_error(code, err, "patch", *parts)
    assert not (tmp_path / "o").exists()


def test_patch_of_a_missing_directory_gives_one_line(capsys, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, "patch", str(missing), "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "patch", str(missing))


def test_patch_and_push_to_the_hub(capsys, fake_hub: HubServer, base_gpt2: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "patched"
    argv = ["patch", str(base_gpt2), "--sparsity", "0.3", "--output_dir", str(out_dir), "--push_to_hub", "me/gpt2-r03"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "me/gpt2-r03" in out.splitlines()[-1]

    files = fake_hub.files("me/gpt2-r03")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    card = files["README.md"].decode()
    assert card.count(hub.SECTION_START) == 1 and 'hf_sparse_attn.from_pretrained("me/gpt2-r03")' in card
    pushed = hf_sparse_attn.from_pretrained("me/gpt2-r03").eval()
    local = hf_sparse_attn.from_pretrained(out_dir).eval()
    assert json.loads(files["config.json"])[CONFIG_KEY]["sparsity"] == 0.3
    with torch.no_grad():
        assert torch.equal(pushed(**padded_batch()).logits, local(**padded_batch()).logits)


# -- push: arguments in `hf upload` order ------------------------------------------------------------------------


def test_push_with_folder_first_names_the_order(capsys, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    hf_sparse_attn.patch_model(tiny_model(transformers.GPT2LMHeadModel), sparsity=0.5).save_pretrained(folder)
    code, _, err = run_cli(capsys, "push", str(folder), "me/repo")
    assert_one_line_error(code, err, "push", "REPO_ID FOLDER", "hf upload")


# -- eval-ppl and plot: one line for bad files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "binary"])
def test_eval_ppl_bad_file_gives_one_line(capsys, base_gpt2: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "corpus.txt"
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 64)
    code, _, err = run_cli(capsys, "eval-ppl", "--model", str(base_gpt2), "--file", str(path), "--no-progress")
    assert_one_line_error(code, err, "eval-ppl")
    assert str(path) in err or "utf-8" in err.lower(), err


def write_state(folder: Path, log_history: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))
    return folder


LOGS = [{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}, {"eval_loss": 1.7, "eval_accuracy": 0.5, "step": 2}]


@pytest.mark.parametrize("kind", ["missing-dir", "no-state", "not-json", "no-log-history", "nothing-to-plot"])
def test_plot_bad_file_gives_one_line(capsys, tmp_path: Path, kind: str) -> None:
    run_dir = tmp_path / "run"
    if kind != "missing-dir":
        run_dir.mkdir()
    if kind == "not-json":
        (run_dir / "trainer_state.json").write_text("{ not json")
    elif kind == "no-log-history":
        (run_dir / "trainer_state.json").write_text('{"global_step": 3}')
    elif kind == "nothing-to-plot":
        write_state(run_dir, [{"step": 1, "epoch": 0.5}])
    code, _, err = run_cli(capsys, "plot", str(run_dir))
    assert_one_line_error(code, err, "plot", str(run_dir))


@pytest.mark.parametrize("trailing", ["", "/"], ids=["existing-dir", "new-dir-with-slash"])
def test_plot_out_directory_prints_the_written_path(capsys, tmp_path: Path, trailing: str) -> None:
    run_dir = write_state(tmp_path / "run", LOGS)
    out_dir = tmp_path / "figures"
    if not trailing:
        out_dir.mkdir()
    code, out, err = run_cli(capsys, "plot", str(run_dir), "--out", f"{out_dir}{trailing}")
    assert code == 0, err
    written = out_dir / "training.png"
    assert out.startswith(f"wrote {written} ") and written.read_bytes().startswith(PNG_SIGNATURE)


def test_plot_without_matplotlib_names_the_extra(capsys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError
    code, _, err = run_cli(capsys, "plot", str(write_state(tmp_path / "run", LOGS)))
    assert_one_line_error(code, err, "plot", "matplotlib", 'pip install "hf-sparse-attn[plot]"')
