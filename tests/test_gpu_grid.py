"""benchmarks/reproduce/gpu_grid.sh without a GPU: its option checks, its dry run, and what it packs.

The packing test replaces ``python3``, ``nvidia-smi`` (and so pip and the drivers) by stubs on ``PATH``: a stub
driver records its arguments and writes one new result JSON. Checked: the driver gets ``--device cuda``, the jobs,
the data folder and the scratch folders; only the JSON files that were not in the repository's results are packed;
a JSON an earlier call on the same machine left behind is packed again; the drivers' logs are packed apart.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "reproduce" / "gpu_grid.sh"


def grid(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dry-run"], "OUT_DIR is required"),
        (["out", "--tables", "lm_heads,bert"], "--tables: unknown table 'bert'; allowed: lm_heads, glue"),
        (["out", "--jobs", "0"], "--jobs must be a positive integer, got '0'"),
        (["out", "--budget", "soon"], "--budget must be a positive number of seconds, got 'soon'"),
        (["out", "--gpus", "2"], "unknown option --gpus"),
    ],
)
def test_bad_options_exit_2_naming_the_option(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr


def test_dry_run_prints_the_driver_call_and_runs_nothing(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    done = grid(str(out), "--dry-run", "--tables", "lm_heads", "--jobs", "3", "--budget", "400", "--work", str(work))
    assert done.returncode == 0, done.stderr
    driver = next(line for line in done.stdout.splitlines() if "benchmarks.reproduce.lm_heads" in line)
    assert driver.startswith("+ timeout -s INT -k 20 ")
    assert int(driver.split()[6]) <= 400  # the budget left when it starts
    assert "--device cuda --jobs 3 --threads 1" in driver
    assert f"--results-dir {work}/results --checkpoint-dir {work}/checkpoints" in driver
    assert "benchmarks.reproduce.glue" not in done.stdout
    assert f"tar -czf {out}/results.tar.gz" in done.stdout
    assert not work.exists()
    assert list(out.iterdir()) == []


def write_stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_packs_only_new_result_files_and_the_logs(tmp_path: Path) -> None:
    stubs, out, work, data = tmp_path / "stubs", tmp_path / "out", tmp_path / "work", tmp_path / "data"
    stubs.mkdir()
    for folder in ("ptb", "wikitext-2"):
        (data / folder).mkdir(parents=True)
    # the stub driver: records its arguments, writes one new result into --results-dir and says so
    write_stub(
        stubs,
        "python3",
        f"""if [ "$1" = "-m" ] && [ "$2" = "benchmarks.reproduce.lm_heads" ]; then
  echo "$@" > {tmp_path}/driver-args
  while [ $# -gt 0 ]; do [ "$1" = "--results-dir" ] && results=$2; shift; done
  mkdir -p "$results/lm_heads" && echo '{{}}' > "$results/lm_heads/new-run-seed0-0123abcd.json"
  echo "done lm_heads/new-run-seed0"
fi
exit 0
""",
    )
    write_stub(stubs, "nvidia-smi", "echo stub GPU\n")
    # an earlier call on this (still warm) machine finished a run whose pack never came back: not in the repository
    earlier = work / "results" / "lm_heads" / "earlier-run-seed0-89abcdef.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("{}")
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STAGE": str(tmp_path / "stage")}
    done = grid(str(out), "--tables", "lm_heads", "--jobs", "5", "--data", str(data), "--work", str(work), env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    args = (tmp_path / "driver-args").read_text().split()
    assert args[args.index("--device") + 1] == "cuda"
    assert args[args.index("--jobs") + 1] == "5"
    assert args[args.index("--data-dir") + 1] == str(data)
    assert args[args.index("--checkpoint-dir") + 1] == str(work / "checkpoints")
    with tarfile.open(out / "results.tar.gz") as packed:
        names = sorted(packed.getnames())  # the repository's results stay out, the earlier call's comes back
    assert names == ["lm_heads/earlier-run-seed0-89abcdef.json", "lm_heads/new-run-seed0-0123abcd.json"]
    with tarfile.open(out / "logs.tar.gz") as packed:
        log = packed.extractfile("logs/lm_heads.driver.log").read().decode()
    assert "done lm_heads/new-run-seed0" in log
    assert "lm_heads: done lm_heads/new-run-seed0" in (out / "grid.log").read_text()
    assert sorted(path.name for path in out.iterdir()) == ["grid.log", "logs.tar.gz", "results.tar.gz"]
