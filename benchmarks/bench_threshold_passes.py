"""Passes over the keys that the r-softmax threshold search takes (issue 13 goal: <= 5 on average per row block).

The threshold kernel (``hf_sparse_attn.kernels.r_softmax_threshold_triton``) reports each row block's pass count
(the block's slowest row decides it; the first pass also finds the row max and count). This script records the
mean and max over row blocks for rates 0.25 / 0.5 / 0.9 on score distributions:

- ``gaussian``: q, k ~ N(0, 1), D = 64, scale 1/8 (non-causal and causal);
- ``lognormal``: skewed scores, each row a log-normal(0, 1) sample (q one-hot, so scores are k's entries);
- ``minilm``: the real scores of all-MiniLM-L6-v2 (the packaged copy) on GLUE SST-2 dev sentences packed into one
  sequence per batch row, every layer and head;
- ``gpt2``: the real causal scores of a small GPT-2 trained here for a few steps on WikiText-2 (from the data
  folder, so skipped without it; random initialisation would give near-Gaussian scores).

Pass counts do not depend on the device: on CPU the kernel runs in Triton's interpreter (set before Triton is
imported), so keep ``--lengths`` small there. Writes ``benchmarks/results/pass_count-<device>-<date>.json`` with a
goal line per record and prints a table::

    python -m benchmarks.bench_threshold_passes                     # GPU: N = 1024, 4096
    python -m benchmarks.bench_threshold_passes --device cpu --lengths 256 --sources gaussian lognormal
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import RESULTS_DIR, machine_info, write_results  # noqa: E402

OP = "pass_count"
SOURCES = ("gaussian", "lognormal", "minilm", "gpt2")
RATES = (0.25, 0.5, 0.9)
GOAL_PASSES = 5.0
DATA_DIR = Path(os.environ.get("HF_SPARSE_ATTN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def synthetic(source: str, length: int, rows: int, heads: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(q [1, H, rows, D], k [1, H, N, D], scale)`` with Gaussian or log-normal scores."""
    generator = torch.Generator().manual_seed(0)
    if source == "gaussian":
        q = torch.randn(1, heads, rows, 64, generator=generator)
        k = torch.randn(1, heads, length, 64, generator=generator)
        return q.to(device), k.to(device), 64**-0.5
    k = torch.randn(1, heads, length, 16, generator=generator).exp()  # log-normal entries
    q = torch.nn.functional.one_hot(torch.randint(16, (1, heads, rows), generator=generator), 16).float()
    return q.to(device), k.to(device), 1.0


def sst2_sentences() -> list[str]:
    path = DATA_DIR / "glue" / "SST-2" / "dev.tsv"
    lines = path.read_text().splitlines()[1:]
    return [line.split("\t")[0] for line in lines]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, T, H * D]`` projections as contiguous ``[B, H, T, D]``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2).contiguous()  # (B, H, T, D)


def capture_qk(
    model: torch.nn.Module, inputs: dict, modules: list[tuple[torch.nn.Module, torch.nn.Module]], heads: int
):
    """``[(q, k)]`` per layer, ``[B, H, T, D]``, from forward hooks on the query and key projections."""
    outputs: dict[int, torch.Tensor] = {}

    def hook(index: int):
        return lambda _module, _inputs, output: outputs.__setitem__(index, output.detach())

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(x for pair in modules for x in pair)]
    with torch.no_grad():
        model(**inputs)
    for handle in handles:
        handle.remove()
    return [(split_heads(outputs[2 * i], heads), split_heads(outputs[2 * i + 1], heads)) for i in range(len(modules))]


def minilm_scores(length: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float, bool]]:
    """MiniLM's (q, k) per layer on SST-2 dev sentences packed into 2 sequences of ``length`` tokens."""
    from transformers import AutoModel, AutoTokenizer

    from hf_sparse_attn.commands.packaged_model import verified_minilm_path

    path = verified_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    ids = tokenizer(" ".join(sst2_sentences()[:400]), add_special_tokens=False)["input_ids"]
    length = min(length, model.config.max_position_embeddings)
    input_ids = torch.tensor(ids[: 2 * length]).view(2, length)
    layers = model.encoder.layer
    modules = [(layer.attention.self.query, layer.attention.self.key) for layer in layers]
    heads = model.config.num_attention_heads
    for index, (q, k) in enumerate(capture_qk(model, {"input_ids": input_ids}, modules, heads)):
        yield f"minilm-L{index}", q.to(device), k.to(device), q.shape[-1] ** -0.5, False


def gpt2_scores(
    length: int, device: torch.device, steps: int
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, float, bool]]:
    """(q, k) per layer of a 4-layer GPT-2 (byte-level vocabulary) trained for ``steps`` steps on WikiText-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with gzip.open(DATA_DIR / "wikitext-2" / "wiki.train.tokens.gz", "rt") as file:
        text = file.read()
    data = torch.tensor(list(text.encode()[:2_000_000]), dtype=torch.long)
    config = GPT2Config(
        n_layer=4, n_head=4, n_embd=128, vocab_size=256, n_positions=max(length, 128), bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(len(data) - 129, (16,))
        batch = torch.stack([data[s : s + 128] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    input_ids = data[: 2 * length].view(2, length)
    heads = config.n_head
    hooks = [(block.attn.c_attn, None) for block in model.transformer.h]
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: outputs.append(o.detach())) for m, _ in hooks]
    with torch.no_grad():
        model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    for index, qkv in enumerate(outputs):
        q, k, _ = qkv.split(config.n_embd, dim=-1)  # (B, T, C) each
        q, k = split_heads(q, heads).to(device), split_heads(k, heads).to(device)
        yield f"gpt2-L{index} (loss {loss.item():.2f})", q, k, q.shape[-1] ** -0.5, True


def count_passes(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool, block_m: int) -> dict[float, list[int]]:
    """Pass counts per row block for each rate (one rate for all heads at a time)."""
    from hf_sparse_attn.kernels.r_softmax_threshold_triton import r_softmax_threshold

    counts = {}
    for rate in RATES:
        rates = torch.full((q.shape[1],), rate, device=q.device)
        found = r_softmax_threshold(q, k, None, rates, causal, scale, 1e-8, block_m=block_m)
        counts[rate] = found.passes.flatten().tolist()
    return counts


def cases(
    args: argparse.Namespace, device: torch.device
) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor, float, bool]]:
    for source in args.sources:
        for length in args.lengths:
            if source in ("gaussian", "lognormal"):
                q, k, scale = synthetic(source, length, args.rows, args.heads, device)
                yield source, length, q, k, scale, False
                if source == "gaussian":
                    q, k, scale = synthetic(source, length, length, args.heads, device)
                    rows = slice(length - args.rows, length) if args.rows < length else slice(None)
                    yield "gaussian-causal", length, q[:, :, rows].contiguous(), k, scale, True
            elif not DATA_DIR.is_dir():
                print(f"skipping {source}: data folder {DATA_DIR} not found")
            elif source == "minilm":
                for name, q, k, scale, causal in minilm_scores(length, device):
                    yield name, length, q[:, :, : args.rows].contiguous(), k, scale, causal
            else:
                for name, q, k, scale, causal in gpt2_scores(length, device, args.gpt2_steps):
                    yield name, length, q[:, :, -args.rows :].contiguous(), k, scale, causal


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--lengths", nargs="+", type=int, help="keys per row N (default 1024 4096; CPU 256)")
    parser.add_argument("--rows", type=int, help="query rows per head (default N on CUDA, 128 on CPU)")
    parser.add_argument("--heads", type=int, default=4, help="heads of the synthetic sources")
    parser.add_argument("--block-m", type=int, default=64)
    parser.add_argument("--gpt2-steps", type=int, default=60, help="training steps of the GPT-2 source")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="smoke run: N = 64, 64 rows, sources gaussian lognormal")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="suffix of the results file name (pass_count-NAME-<device>-<date>.json)")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    if args.small:
        args.lengths, args.rows, args.sources, args.heads = [64], 64, ["gaussian", "lognormal"], 2
    args.lengths = args.lengths or ([256] if cpu else [1024, 4096])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    header = machine_info(device)
    print(header)
    records: list[dict[str, Any]] = []
    for name, _length, q, k, scale, causal in cases(args, device):
        rows = args.rows or q.shape[2]
        q = q[:, :, :rows].contiguous()
        for rate, passes in count_passes(q, k, scale, causal, args.block_m).items():
            mean = sum(passes) / len(passes)
            records.append(
                {
                    "source": name,
                    "N": k.shape[2],
                    "rows": q.shape[2],
                    "heads": q.shape[1],
                    "causal": causal,
                    "rate": rate,
                    "block_m": args.block_m,
                    "blocks": len(passes),
                    "mean_passes": round(mean, 3),
                    "max_passes": max(passes),
                    "goal": f"mean <= {GOAL_PASSES:g}",
                    "goal_met": mean <= GOAL_PASSES,
                }
            )
            print(f"  {name:>28} N{k.shape[2]} r{rate}: mean {mean:.2f} max {max(passes)}", flush=True)
    header["args"] = {key: str(v) if isinstance(v, Path) else v for key, v in vars(args).items()}
    header["goal_met"] = all(r["goal_met"] for r in records)
    path = write_results(f"{OP}-{args.name}" if args.name else OP, header, records, args.out_dir)
    columns = ("source", "N", "rate", "blocks", "mean_passes", "max_passes", "goal_met")
    widths = [max(len(c), *(len(str(r[c])) for r in records)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in records:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths, strict=True)))
    print(f"goal (mean passes <= {GOAL_PASSES:g} for every record): {'PASS' if header['goal_met'] else 'FAIL'}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
