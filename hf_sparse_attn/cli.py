"""The ``hf-sparse-attn`` command.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps command names to modules, so adding a command is one row in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: command name -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_sparse_attn.demo", "patch the packaged MiniLM, show its sparsity, fine-tune it for a minute on CPU"),
    "eval-ppl": ("hf_sparse_attn.perplexity", "perplexity of a (patched) causal LM on a text file"),
    "push": ("hf_sparse_attn.hub", "push a patched checkpoint (e.g. a recipe's output dir) to the Hub with a card"),
    "plot": ("hf_sparse_attn.plotting", "plot loss/metric curves and per-layer sparsity from a Trainer output dir"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (a broken or slow command cannot break the others)."""
    parser = argparse.ArgumentParser(
        prog="hf-sparse-attn",
        description="r-softmax attention and softmax-bottleneck-free LM heads for HF Transformers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
