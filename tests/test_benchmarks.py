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
