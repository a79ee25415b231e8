"""Smoke runs of the benchmark scripts on CPU with tiny shapes, to catch bit-rot (no timing is asserted).

Only providers that need neither CUDA nor Triton run here; the scripts skip the others with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER_KEYS = {"device", "torch", "triton", "transformers", "hf_sparse_attn", "git_commit", "timestamp", "args"}
RECORD_KEYS = {
    "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "baseline",
    "speedup_vs_baseline",
}  # fmt: skip


@pytest.fixture(autouse=True)
def repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # the scripts import `benchmarks.common`


def run_and_load(module_name: str, argv: list[str], out_dir: Path, capsys: pytest.CaptureFixture) -> dict:
    module = __import__(f"benchmarks.{module_name}", fromlist=["main"])
    assert module.main([*argv, "--device", "cpu", "--small", "--reps", "1", "--out-dir", str(out_dir)]) == 0
    (path,) = out_dir.glob(f"{module.OP}-*.json")
    printed = capsys.readouterr().out
    assert f"wrote {path}" in printed and "median_ms" in printed  # the table
    return json.loads(path.read_text())


def check_records(results: dict, providers: list[str], modes: list[str], cases: int, baseline: str) -> None:
    assert results.keys() >= HEADER_KEYS
    records = results["records"]
    assert len(records) == len(providers) * len(modes) * cases
    assert {r["provider"] for r in records} == set(providers)
    for record in records:
        assert record.keys() >= RECORD_KEYS
        assert record["median_ms"] > 0 and record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["baseline"] == baseline and record["speedup_vs_baseline"] > 0
        if record["provider"] == baseline:
            assert record["speedup_vs_baseline"] == 1.0


def test_attention_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    providers = ["sdpa", "eager_softmax", "reference"]
    argv = ["--providers", *providers, "--modes", "fwd", "bwd", "fwdbwd", "--lengths", "24"]
    argv += ["--masks", "causal", "padded", "--rates", "0.5"]
    results = run_and_load("bench_r_softmax_attention", argv, tmp_path, capsys)
    check_records(results, providers, ["fwd", "bwd", "fwdbwd"], cases=2, baseline="sdpa")  # causal + padded
    assert {r["shape"]["mask"] for r in results["records"]} == {"causal", "padded"}


def test_patched_forward_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture, minilm_path: str) -> None:
    providers = ["sdpa", "eager", "rsoftmax-none", "rsoftmax-0.5"]
    results = run_and_load("bench_patched_forward", [], tmp_path, capsys)
    check_records(results, providers, ["fwd", "fwdbwd"], cases=1, baseline="sdpa")
    assert all(r["median_cpu_ms"] > 0 and r["cpu_ratio_vs_baseline"] > 0 for r in results["records"])
    assert [(g["limit"], isinstance(g["pass"], bool)) for g in results["goals"]] == [(1.5, True), (2.0, True)]


def test_lm_head_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    providers = ["linear_ce", "sigsoftmax", "mos", "plif", "fused_softmax", "fused_mos", "fused_plif"]
    results = run_and_load("bench_lm_head", ["--providers", *providers, "--modes", "fwdbwd"], tmp_path, capsys)
    check_records(results, providers, ["fwdbwd"], cases=1, baseline="linear_ce")
    fused = {r["provider"]: r for r in results["records"] if r["provider"].startswith("fused_")}
    assert {r["unfused"] for r in fused.values()} == {"linear_ce", "mos", "plif"}
    assert all(r["time_vs_unfused"] > 0 and r["peak_vs_unfused"] > 0 for r in fused.values())


def test_threshold_pass_count_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The pass-count benchmark runs the threshold kernel (Triton's interpreter on CPU) and records, per source
    and rate, the mean and max passes per row block with the <= 5 goal."""
    pytest.importorskip("triton")
    module = __import__("benchmarks.bench_threshold_passes", fromlist=["main"])
    assert module.main(["--device", "cpu", "--small", "--out-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob(f"{module.OP}-*.json")
    results = json.loads(path.read_text())
    assert "goal (mean passes <= 5" in capsys.readouterr().out
    records = results["records"]
    assert {r["source"] for r in records} == {"gaussian", "gaussian-causal", "lognormal"}
    assert {r["rate"] for r in records} == {0.25, 0.5, 0.9}
    for record in records:
        assert 1 <= record["mean_passes"] <= record["max_passes"] <= 64
        assert record["goal_met"] == (record["mean_passes"] <= 5)


def test_gpu_check_script_steps_parse() -> None:
    """``benchmarks/gpu_check.sh --dry-run`` lists its steps; every benchmark step's arguments parse, and the time
    limits add up to less than the 8 minutes the GPU check may take."""
    import shlex
    import subprocess

    script = REPO / "benchmarks" / "gpu_check.sh"
    printed = subprocess.run(["bash", str(script), "--dry-run", "out"], capture_output=True, text=True, check=True)
    steps = [line for line in printed.stdout.splitlines() if line.startswith("== ")]
    assert len(steps) >= 5
    limits = [int(line.split("(limit ")[1].split(" s)")[0]) for line in steps]
    assert sum(limits) < 8 * 60
    for line in steps:
        command = shlex.split(line.split(": ", 1)[1])
        if command[:3] == ["python", "-m", "pytest"] or not command[2].startswith("benchmarks."):
            continue
        module = __import__(command[2], fromlist=["parse_args"])
        args = module.parse_args(command[3:])
        assert str(args.out_dir) == "out"
