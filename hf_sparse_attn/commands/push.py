"""``hf-sparse-attn push REPO_ID FOLDER``: push a saved patched checkpoint to the Hub with its model card.

The arguments come in the order of ``hf upload``. :func:`hf_sparse_attn.publishing.hub.push_folder` renders the card
from the folder's ``config.json``, ``README.md`` and ``trainer_state.json`` and commits everything in one go; the
folder itself is only read. The Hub client is imported inside :func:`run`, so ``push --help`` answers at once.

Examples::

    $ hf-sparse-attn push me/roberta-rsoftmax-sst2 out/roberta-sst2 --dataset nyu-mll/glue --private
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", help="Hub repository, e.g. me/roberta-rsoftmax-sst2 (created if missing)")
    parser.add_argument("folder", help="checkpoint directory saved from a patched model (e.g. a recipe's output dir)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hub token (default: $HF_TOKEN, then the `hf auth login` cache)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload model patched with hf_sparse_attn')")
    parser.add_argument("--revision", help="branch to push to (created from main if missing)")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from, for the card")
    parser.add_argument("--dataset", help="Hub dataset id the evaluation results were measured on, for the card")


def run(args: argparse.Namespace) -> int:
    from hf_sparse_attn.publishing.hub import push_folder

    try:
        commit = push_folder(
            args.folder,
            args.repo_id,
            private=args.private or None,
            token=args.token,
            revision=args.revision,
            commit_message=args.commit_message,
            base_model=args.base_model,
            dataset=args.dataset,
        )
    except ValueError as err:
        print(f"hf-sparse-attn push: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the command's last resort: one clear line, no traceback
        # Hub errors (HfHubHTTPError: 401/403/5xx with the server's message), dropped connections (the HTTP
        # client's own errors) and failed LFS uploads (RuntimeError) all end here; nothing was committed.
        print(
            f"hf-sparse-attn push: pushing {args.folder} to {args.repo_id} failed: {describe_error(err)}",
            file=sys.stderr,
        )
        return 1
    print(f"Pushed {args.folder} to {commit.repo_url}: {commit.commit_url}")
    return 0


def describe_error(err: BaseException) -> str:
    """``err`` and the causes that add something (e.g. the HTTP error behind "Error while uploading ...")."""
    message = f"{type(err).__name__}: {err}"
    cause = err.__cause__
    while cause is not None:
        first_line = (str(cause).splitlines() or [""])[0]
        if first_line not in message:
            message += f"\n  caused by {type(cause).__name__}: {first_line}"
        cause = cause.__cause__
    return message
