"""``hf-sparse-attn patch``: the one-line way to publish a patched checkpoint with its model card.

Loads ``MODEL`` (a Hub id or a local directory), calls :func:`~hf_sparse_attn.patch_model`, saves model and
tokenizer into ``--output-dir`` with the card (``README.md``,
:func:`hf_sparse_attn.publishing.hub.write_model_card`) and, with ``--push-to-hub REPO``, pushes that directory in
one commit (:func:`hf_sparse_attn.publishing.hub.push_folder`). The class is the one ``config.json`` names
(``architectures[0]``), or the one ``--task`` asks for, e.g. a causal-LM class for ``gpt2`` so that a new LM head
has something to replace.

Examples::

    $ hf-sparse-attn patch openai-community/gpt2 --sparsity 0.5 --head moss --output-dir gpt2-moss
    $ hf-sparse-attn patch google-bert/bert-base-uncased --sparsity none,none,0.5 --task masked-lm \\
        --output-dir bert-rsoftmax --push-to-hub me/bert-rsoftmax --private
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: ``--task`` -> transformers Auto class; "auto" uses ``architectures[0]`` of the checkpoint's config
TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
#: PatchConfig options of the heads, passed on only when given
HEAD_OPTIONS = ("num_mixtures", "num_knots", "knot_range")


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    """``--task``: which class loads MODEL (shared by the commands that load a checkpoint)."""
    parser.add_argument(
        "--task",
        choices=["auto", *TASKS],
        default="auto",
        help="model class to load: auto (the class config.json names), or a task's Auto class",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``hf-sparse-attn patch``."""
    parser.add_argument("model", help="Hub model id (e.g. openai-community/gpt2) or local checkpoint directory")
    parser.add_argument(
        "--sparsity",
        help="r-softmax rate in [0, 1] for every layer, 'none' (softmax), or a comma list with one entry per layer "
        "(e.g. none,none,0.5,0.5); default: softmax everywhere",
    )
    parser.add_argument("--head", help="new LM head: sigsoftmax, mos, moss or plif (default: keep the softmax head)")
    parser.add_argument("--num-mixtures", type=int, help="mixture components K of the mos / moss heads")
    parser.add_argument("--num-knots", type=int, help="knots of the plif head")
    parser.add_argument("--knot-range", type=float, help="the plif knots span [-knot_range, knot_range]")
    add_task_argument(parser)
    parser.add_argument("--num-labels", type=int, help="labels of a new classifier (--task sequence-classification)")
    parser.add_argument("--model-revision", help="branch, tag or commit of MODEL on the Hub")
    parser.add_argument("--output-dir", required=True, help="directory to write the patched checkpoint and card to")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="then push the directory to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", help="Hub token (default: $HF_TOKEN, then the `hf auth login` cache)")
    parser.add_argument("--revision", help="branch of REPO_ID to push to (created from main if missing)")
    parser.add_argument("--commit-message", help="commit message of the push")


def load_model(name: str, task: str, revision: str | None, token: str | None, num_labels: int | None) -> Any:
    """``name`` loaded with the class ``task`` asks for (``"auto"``: the class its ``config.json`` names)."""
    import transformers

    kwargs: dict[str, Any] = {"revision": revision, "token": token}
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    if task != "auto":
        return getattr(transformers, TASKS[task]).from_pretrained(name, **kwargs)
    config = transformers.AutoConfig.from_pretrained(name, revision=revision, token=token)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise ValueError(
            f"{name}: config.json names no transformers model class in `architectures` ({architectures!r}); "
            f"choose one with --task ({', '.join(TASKS)})"
        )
    return model_class.from_pretrained(name, **kwargs)


def run(args: argparse.Namespace) -> int:
    """Load, patch, save with the card, push if asked; returns the exit status."""
    from transformers import AutoTokenizer

    from hf_sparse_attn.commands.push import describe_error
    from hf_sparse_attn.config import PatchConfig
    from hf_sparse_attn.patch import patch_model
    from hf_sparse_attn.publishing import hub
    from hf_sparse_attn.training.recipe import parse_sparsity

    sparsity = parse_sparsity(args.sparsity)
    head_options = {name: getattr(args, name) for name in HEAD_OPTIONS if getattr(args, name) is not None}
    PatchConfig(sparsity=sparsity, head=args.head, **head_options)  # bad options fail before a download
    model = load_model(args.model, args.task, args.model_revision, args.token, args.num_labels)
    patch_model(model, sparsity=sparsity, head=args.head, **head_options)

    out = Path(args.output_dir)
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(args.model, revision=args.model_revision, token=args.token).save_pretrained(out)
    except (OSError, ValueError) as err:  # a checkpoint without a tokenizer is still a checkpoint
        print(f"note: no tokenizer saved ({type(err).__name__}: {str(err).splitlines()[0]})", file=sys.stderr)
    hub.write_model_card(model, out, repo_id=args.push_to_hub)
    print(f"Saved {type(model).__name__} patched with hf_sparse_attn to {out} (with README.md)")
    if args.push_to_hub is None:
        return 0
    try:
        commit = hub.push_folder(
            out,
            args.push_to_hub,
            private=args.private or None,
            token=args.token,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except Exception as err:  # noqa: BLE001 - as `hf-sparse-attn push`: one clear line, the directory is kept
        print(
            f"hf-sparse-attn patch: pushing {out} to {args.push_to_hub} failed: {describe_error(err)}",
            file=sys.stderr,
        )
        return 1
    print(f"Pushed {out} to {commit.repo_url}: {commit.commit_url}")
    return 0
