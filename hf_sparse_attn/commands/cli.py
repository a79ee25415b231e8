"""The ``hf-sparse-attn`` command.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps command names to modules, so adding a command is one row in :data:`COMMANDS`. Only the
module of the command being run is imported, and those modules import torch and transformers inside ``run``:
``hf-sparse-attn --help`` and ``hf-sparse-attn COMMAND --help`` answer without loading them.

Options take one style everywhere and accept both spellings, as ``transformers.HfArgumentParser`` does:
``--output-dir`` and ``--output_dir`` are the same option. A command that fails on its input (a missing or
malformed file, a model it cannot patch, a missing optional package: :data:`INPUT_ERRORS`, also when a library
wraps them) prints one line ``hf-sparse-attn COMMAND: what went wrong`` to stderr and exits with status 2, without a
traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from hf_sparse_attn import __version__

#: command name -> (module of :mod:`hf_sparse_attn.commands` implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "patch all-MiniLM-L6-v2, show its sparsity, fine-tune it with the Trainer"),
    "patch": ("publish", "patch a checkpoint, save it with its model card, optionally push it"),
    "push": ("push", "push a patched checkpoint (e.g. a recipe's output dir) to the Hub with a card"),
    "eval-ppl": ("eval_ppl", "perplexity of a (patched) causal LM on a text file"),
    "calibrate": ("calibrate", "choose r per layer or head from data; save the patched checkpoint"),
    "plot": ("plot", "plot loss/metric curves and per-layer sparsity from a Trainer output dir"),
    "env": ("env", "print versions and devices, to paste into a bug report"),
}


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose long options also answer to their other spelling (``-`` <-> ``_``)."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        twins = [_twin(name) for name in names if name.startswith("--")]
        return super().add_argument(*names, *(t for t in twins if t not in names), **kwargs)


def _twin(option: str) -> str:
    """``--output-dir`` -> ``--output_dir`` and back (``--lr`` stays ``--lr``)."""
    name = option[2:]
    return "--" + (name.replace("-", "_") if "-" in name else name.replace("_", "-"))


def build_parser(command: str | None = None) -> ArgumentParser:
    """The parser; only ``command``'s module is imported (a broken or slow command cannot break the others)."""
    parser = ArgumentParser(
        prog="hf-sparse-attn",
        description="r-softmax attention and softmax-bottleneck-free LM heads for HF Transformers.",
    )
    parser.add_argument("--version", action="version", version=f"hf-sparse-attn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(f"{__package__}.{module_name}")
            module.add_arguments(command_parser)
            command_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except Exception as err:
        if not any(isinstance(e, INPUT_ERRORS) for e in _chain(err)):
            raise  # a bug: keep the traceback
        print(f"hf-sparse-attn {args.command}: {_one_line(err)}", file=sys.stderr)
        return 2


#: errors that mean bad input (a missing / malformed file, a checkpoint that cannot be loaded or patched, a missing
#: extra), also when a library wraps them (e.g. datasets' DatasetGenerationError around a UnicodeDecodeError)
INPUT_ERRORS = (ValueError, OSError, ModuleNotFoundError)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``raise ... from``; not those it was raised while handling,
    so that a bug in an ``except`` block keeps its traceback)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__
    return chain


def _one_line(err: BaseException) -> str:
    """The messages of ``err``'s chain that add something, on one line."""
    parts: list[str] = []
    for e in _chain(err):
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not any(first in part for part in parts):
            parts.append(first if e is err else f"{type(e).__name__}: {first}")
    return "; caused by ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
