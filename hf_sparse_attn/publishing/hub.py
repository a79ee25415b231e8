"""Share patched checkpoints on the Hugging Face Hub with a model card (``hf-sparse-attn push`` is
:mod:`hf_sparse_attn.commands.push`).

The card is rendered from ``model_cards/template.md`` (at the top of the repository; the wheel carries it as
``hf_sparse_attn/publishing/model_cards/template.md``) with :class:`huggingface_hub.ModelCard` /
:class:`~huggingface_hub.ModelCardData`. It describes what ``patch_model`` did (read from the ``hf_sparse_attn``
entry of ``config.json``), the measured sparsity and evaluation results when known (``model-index`` metadata
through :class:`~huggingface_hub.EvalResult`), training hyper-parameters, framework versions, how to load the
model back and what to cite. Our part of the card sits between two HTML comments, so re-rendering replaces it
in place: an existing card (the Trainer's, or one edited on the Hub) keeps everything else, and pushing twice
never duplicates it.

``patch_model`` only tags the model (``model.add_model_tags(model_tags(...))``); it does not touch how the model
is saved or pushed. The tags reach every push path, since transformers puts ``model.model_tags`` into the card of
``model.push_to_hub`` and of ``Trainer.push_to_hub``. Our card *section* needs one of these (transformers 5.23
offers no hook for it: ``PreTrainedModel.push_to_hub`` writes ``README.md`` after ``save_pretrained``, from the
repo's current card or a generic template, and ``Trainer.push_to_hub`` rewrites it with ``Trainer.create_model_card``
after saving; see docs/transformers-notes.md), each one commit with weights, ``config.json`` and ``README.md``:

- :func:`push_to_hub` (``hf_sparse_attn.publishing.hub.push_to_hub(model, repo_id)``): same arguments as
  ``model.push_to_hub``, with the card.
- ``Trainer.push_to_hub()`` and ``TrainingArguments(push_to_hub=True)`` (``trainer.save_model()`` pushes):
  :func:`bind_trainer_card` makes that Trainer's ``create_model_card`` merge our section into the card it writes
  (its results table, hyper-parameters and versions are kept).
- ``hf-sparse-attn push REPO_ID FOLDER`` (the order of ``hf upload``): :func:`push_folder` uploads a saved
  checkpoint (e.g. a recipe's output directory) and renders the card from its ``config.json``, ``README.md`` and
  ``trainer_state.json``; the directory itself is only read. ``hf-sparse-attn patch MODEL ... --output-dir DIR``
  writes the card into ``DIR`` with :func:`write_model_card` (``--push-to-hub REPO`` then pushes ``DIR``).

Tokens are resolved the usual ``huggingface_hub`` way: ``token=`` / ``--token``, then ``HF_TOKEN``, then the
``hf auth login`` cache.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import CommitInfo, CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import filter_repo_objects

if TYPE_CHECKING:  # imported where used: hf_sparse_attn.config imports torch, which card rendering does not need
    from hf_sparse_attn.config import PatchConfig

#: ``library_name`` of the cards we write (the PyPI name, as ``pip install`` and the CLI spell it)
LIBRARY_NAME = "hf-sparse-attn"
TEMPLATE_PATH = Path(__file__).parent / "model_cards" / "template.md"
SECTION_START, SECTION_END = "<!-- hf_sparse_attn:start -->", "<!-- hf_sparse_attn:end -->"
#: files of a checkpoint directory that are not pushed (same as ``Trainer.push_to_hub``), plus the card we render
IGNORE_PATTERNS = ["_*", "checkpoint-*", ".git/*", "README.md"]
_FRAMEWORKS = ("hf-sparse-attn", "transformers", "torch", "huggingface_hub")
#: measured sparsity in Trainer logs: ``sparsity/layer_3`` (what ``training.SparsityLoggingCallback`` logs),
#: ``eval_sparsity/layer_3``, ``sparsity_3``, ...
_SPARSITY_LOG_KEY = re.compile(r"^(?:eval_|train_)?sparsity[/_](?:layer_?)?(\d+)$")
_NOT_METRICS = {"runtime", "samples_per_second", "steps_per_second", "epoch", "step"}
_PIPELINE_TAGS = {
    "ForSequenceClassification": "text-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
}


def create_model_card(
    model: Any,
    *,
    card: ModelCard | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    measured_sparsity: Sequence[float | None] | None = None,
    eval_results: Mapping[str, float] | None = None,
    dataset: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    log_history: Sequence[Mapping[str, Any]] | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """Render the model card of a patched model, or update ``card`` with it.

    Args:
        model: a patched model, or its config (anything with the ``hf_sparse_attn`` entry that ``patch_model``
            writes into ``model.config``).
        card: an existing card to update (e.g. the Trainer's or the repo's current one): our section, between
            ``<!-- hf_sparse_attn:start/end -->``, is replaced or inserted after its title; its other text and
            metadata are kept; ``library_name`` becomes ``hf-sparse-attn`` and tags are merged.
        repo_id: where the model lives, for the card's loading snippet.
        base_model: the Hub id the model was fine-tuned from; default ``model.config._name_or_path`` when it
            looks like a Hub id (not a local directory, not ``repo_id`` itself).
        measured_sparsity: fraction of exact zeros per layer (``hf_sparse_attn.measure_sparsity``); default: the
            latest ``sparsity/layer_<i>`` values in ``log_history``.
        eval_results: ``{metric: value}``, e.g. ``trainer.evaluate()`` (``eval_`` prefixes, timings and epoch are
            dropped); default: the latest ``eval_*`` entry of ``log_history``.
        dataset: Hub dataset id the results were measured on, needed for ``model-index`` metadata; default: the
            first of ``card``'s ``datasets``.
        hyperparameters: training hyper-parameters to list (skipped if ``card`` already lists them).
        log_history: ``Trainer.state.log_history`` (or ``trainer_state.json``'s).
        tags: extra tags.

    Returns:
        The card (``str(card)`` is the README.md text).

    Examples::

        >>> card = create_model_card(model, repo_id="me/roberta-rsoftmax-sst2", dataset="glue",
        ...                          eval_results={"accuracy": 0.91}, measured_sparsity=measure_sparsity(model, batch))
        >>> card.save("out/README.md")
    """
    from hf_sparse_attn.config import CONFIG_KEY, PatchConfig, layer_rates

    if hasattr(model, "get_base_model"):  # a PEFT model: describe the patched model inside
        model = model.get_base_model()
    config = getattr(model, "config", model)
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        raise ValueError(
            "model: no `hf_sparse_attn` entry in its config; it is not patched (call hf_sparse_attn.patch_model)"
        )
    patch = PatchConfig.from_dict(data)
    architecture = type(model).__name__ if model is not config else (config.architectures or [config.model_type])[0]
    rates = layer_rates(patch.sparsity, config.num_hidden_layers)
    log_history = list(log_history or [])
    measured, measured_source = _measured_sparsity(measured_sparsity, log_history, len(rates))
    metrics = _metrics(eval_results, prefix="") if eval_results is not None else _latest_eval_metrics(log_history)
    base_text = "" if card is None else _without_section(card.text)
    dataset = dataset or (card.data.datasets[0] if card is not None and card.data.datasets else None)
    base_model = base_model or _hub_id(getattr(config, "_name_or_path", None), exclude=repo_id)
    pipeline_tag = next((tag for suffix, tag in _PIPELINE_TAGS.items() if architecture.endswith(suffix)), None)

    card_data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
        datasets=[dataset] if dataset else None,
        tags=_unique(["transformers", config.model_type, *model_tags(rates, patch), *tags]),
        model_name=(repo_id or architecture) if metrics and dataset else None,
        eval_results=[
            EvalResult(
                task_type=pipeline_tag or "other",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=name.lower().replace(" ", "_"),
                metric_name=name,
                metric_value=value,
            )
            for name, value in metrics.items()
        ]
        if metrics and dataset
        else None,
    )
    rendered = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=repo_id.split("/")[-1] if repo_id else f"{architecture} with r-softmax attention",
        base_model_id=base_model,
        architecture=architecture,
        patch_version=patch.version,
        head_name=patch.head_name,
        num_mixtures=patch.num_mixtures,
        num_knots=patch.num_knots,
        knot_range=patch.knot_range,
        causal=bool(getattr(config, "is_decoder", False)) or pipeline_tag == "text-generation",
        layers=[
            {"index": i, "attention": "softmax" if r is None else "r-softmax", "rate": _fmt_rate(r), "measured": m}
            for i, (r, m) in enumerate(zip(rates, measured, strict=True))
        ],
        rsoftmax_layers=[i for i, rate in enumerate(rates) if rate is not None],
        measured_source=measured_source,
        patch_json=json.dumps(data, indent=2, sort_keys=True),
        eval_results=[(name, _fmt(value)) for name, value in metrics.items()],
        hyperparameters=None if "Training hyperparameters" in base_text else list((hyperparameters or {}).items()),
        framework_versions=None if "Framework versions" in base_text else _framework_versions(),
        load_id=repo_id or "<repo_id or local directory>",
    )
    return rendered if card is None else _merge(card, rendered)


def write_model_card(model: Any, save_directory: str | Path, **card_kwargs: Any) -> ModelCard:
    """Write (or update) ``save_directory/README.md`` with :func:`create_model_card`.

    An existing ``README.md`` there (e.g. written by ``Trainer.create_model_card``) is updated, not replaced, and
    a ``trainer_state.json`` there provides the log history unless ``log_history`` is given.

    Examples::

        >>> model.save_pretrained("out")
        >>> write_model_card(model, "out", dataset="glue", eval_results=trainer.evaluate())
    """
    folder = Path(save_directory)
    card_kwargs.setdefault("card", _local_card(folder))
    card_kwargs.setdefault("log_history", _trainer_state(folder).get("log_history"))
    card = create_model_card(model, **card_kwargs)
    card.save(folder / "README.md")
    return card


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: Sequence[str] | None = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """Push a patched model (weights, config, card) in one commit; same arguments as transformers' ``push_to_hub``.

    The repo's current card, if any, is updated rather than replaced. ``card_kwargs`` go to
    :func:`create_model_card` (``dataset``, ``eval_results``, ``measured_sparsity``, ...). transformers' own
    ``model.push_to_hub(repo_id)`` pushes the same files with transformers' card, tagged but without our section.

    Examples::

        >>> hf_sparse_attn.publishing.hub.push_to_hub(model, "me/roberta-rsoftmax-sst2", dataset="glue",
        ...                                           eval_results={"accuracy": 0.91})
    """
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    tags = [*(getattr(model, "model_tags", None) or []), *(tags or [])]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        card = create_model_card(model, card=_remote_card(repo_id, token), repo_id=repo_id, tags=tags, **card_kwargs)
        return _commit(api, Path(tmp), repo_id, card, token, revision, create_pr, commit_message, commit_description)


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    **card_kwargs: Any,
) -> CommitInfo:
    """Push a saved patched checkpoint directory (e.g. a recipe's output dir) with a rendered card, in one commit.

    The card is built from the directory's ``config.json``, its ``README.md`` (e.g. the Trainer's card, updated)
    or else the repo's current card, and its ``trainer_state.json`` (eval results, measured sparsity, batch size and
    epochs). The directory is only read. Files like ``checkpoint-*`` are skipped (see :data:`IGNORE_PATTERNS`).

    Examples::

        >>> push_folder("out", "me/roberta-rsoftmax-sst2", private=True, dataset="glue")
    """
    from transformers import AutoConfig

    from hf_sparse_attn.config import CONFIG_KEY

    folder = Path(folder)
    if not folder.is_dir() and Path(repo_id).is_dir():
        raise ValueError(
            f"folder: {str(folder)!r} is not a directory but repo_id {repo_id!r} is; the order is REPO_ID FOLDER, "
            f"as in `hf upload` (did you mean `push {folder} {repo_id}`?)"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder: {str(folder)!r} has no config.json; pass a directory written by save_pretrained")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, CONFIG_KEY, None) is None:
        raise ValueError(
            f"folder: {folder}/config.json has no `hf_sparse_attn` entry, so it was not saved from a patched model; "
            "push it with `hf upload` or patch the model first"
        )
    state = _trainer_state(folder)
    card_kwargs.setdefault("log_history", state.get("log_history"))
    card_kwargs.setdefault(
        "hyperparameters", {k: state[k] for k in ("train_batch_size", "num_train_epochs") if k in state}
    )
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    base = _local_card(folder) or _remote_card(repo_id, token)
    card = create_model_card(config, card=base, repo_id=repo_id, **card_kwargs)
    return _commit(api, folder, repo_id, card, token, revision, create_pr, commit_message, None)


def model_tags(rates: Sequence[Any], patch: PatchConfig) -> list[str]:
    """Hub tags of a patched model: ``hf-sparse-attn``, ``r-softmax`` and ``sparse-attention`` when some layer
    has a rate, and the head's name (``moss``, ...) when it is not softmax. ``patch_model`` adds them with
    ``model.add_model_tags``.

    Examples::

        >>> model_tags([None, 0.5], PatchConfig(sparsity=[None, 0.5], head="moss"))
        ['hf-sparse-attn', 'r-softmax', 'sparse-attention', 'moss']
    """
    tags = [LIBRARY_NAME]
    if any(rate is not None for rate in rates):
        tags += ["r-softmax", "sparse-attention"]
    return [*tags, patch.head_name] if patch.head_name != "softmax" else tags


def remove_model_tags(model: Any) -> None:
    """Remove the tags :func:`model_tags` gave a patched model (``unpatch_model`` calls this); others stay."""
    from hf_sparse_attn.config import CONFIG_KEY, PatchConfig

    data = getattr(model.config, CONFIG_KEY, None)
    if data is None or not model.model_tags:
        return
    ours = set(model_tags([1.0], PatchConfig.from_dict(data)))  # every tag a rate or the head can add
    model.model_tags = [tag for tag in model.model_tags if tag not in ours] or None


def bind_trainer_card(trainer: Any, **card_kwargs: Any) -> None:
    """Make this ``Trainer``'s model card include our section, so that ``trainer.push_to_hub()`` pushes it.

    ``Trainer.push_to_hub`` writes its own card with ``create_model_card`` and uploads the output directory; we wrap
    that method on the instance to update the card it wrote with :func:`write_model_card` (the Trainer's eval
    results, hyper-parameters and versions stay). ``card_kwargs`` go to :func:`create_model_card`.

    This covers every push of that Trainer that writes a card: ``trainer.push_to_hub()`` and, with
    ``TrainingArguments(push_to_hub=True)`` (``--push_to_hub`` in the recipes), ``trainer.save_model()``.

    Examples::

        >>> trainer = Trainer(model=patched, args=TrainingArguments("out", push_to_hub=True), ...)
        >>> bind_trainer_card(trainer, dataset="glue")
        >>> trainer.train(); trainer.push_to_hub()
    """
    create_trainer_card = trainer.create_model_card

    def create_model_card_with_patch(*args: Any, **kwargs: Any) -> None:
        create_trainer_card(*args, **kwargs)
        if trainer.is_world_process_zero():
            model = trainer.accelerator.unwrap_model(trainer.model)
            known = {"repo_id": getattr(trainer, "hub_model_id", None), "log_history": trainer.state.log_history}
            write_model_card(model, trainer.args.output_dir, **{**known, **card_kwargs})

    trainer.create_model_card = create_model_card_with_patch


def _api() -> HfApi:
    # built at each call so that it follows the current endpoint (HF_ENDPOINT / huggingface_hub.constants)
    from hf_sparse_attn import __version__

    return HfApi(library_name="hf_sparse_attn", library_version=__version__)


def _commit(
    api: HfApi,
    folder: Path,
    repo_id: str,
    card: ModelCard,
    token: bool | str | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    commit_description: str | None,
) -> CommitInfo:
    """One commit: every file of ``folder`` (minus IGNORE_PATTERNS) and the card as README.md."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
        for path in filter_repo_objects(files, ignore_patterns=IGNORE_PATTERNS)
    ]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload model patched with hf_sparse_attn",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def _remote_card(repo_id: str, token: bool | str | None) -> ModelCard | None:
    try:
        return ModelCard.load(repo_id, token=token)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None


def _local_card(folder: Path) -> ModelCard | None:
    path = folder / "README.md"
    return ModelCard.load(path) if path.is_file() else None


def _trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / "trainer_state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _merge(card: ModelCard, rendered: ModelCard) -> ModelCard:
    """Update ``card`` in place: our metadata, and our section of ``rendered`` in place of its old one."""
    ours, data = rendered.data, card.data
    data.library_name = LIBRARY_NAME
    data.tags = _unique([*(data.tags or []), *ours.tags])
    data.base_model = ours.base_model or data.base_model
    data.pipeline_tag = data.pipeline_tag or ours.pipeline_tag
    if ours.datasets:
        data.datasets = _unique([*(data.datasets or []), *ours.datasets])
    if ours.eval_results:
        data.eval_results, data.model_name = ours.eval_results, ours.model_name
    section = _section(rendered.text)
    if SECTION_START in card.text:
        text = _section_pattern().sub(lambda _: section, card.text, count=1)
    else:
        lines = card.text.split("\n")
        title = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        text = "\n".join([*lines[:title], "", section, *lines[title:]])
    card.text = text
    return card


def _section_pattern() -> re.Pattern[str]:
    return re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END), flags=re.DOTALL)


def _section(text: str) -> str:
    match = _section_pattern().search(text)
    if match is None:
        raise ValueError(f"{TEMPLATE_PATH}: the template lost its {SECTION_START} ... {SECTION_END} markers")
    return match.group(0)


def _without_section(text: str) -> str:
    return _section_pattern().sub("", text)


def _measured_sparsity(
    measured: Sequence[float | None] | None, log_history: list[Mapping[str, Any]], num_layers: int
) -> tuple[list[str], str | None]:
    """Per-layer cells of the 'Measured sparsity' column, and where the numbers come from."""
    source = "as measured with `hf_sparse_attn.measure_sparsity`" if measured is not None else None
    if measured is None:
        for entry in reversed(log_history):
            found = {int(m.group(1)): v for k, v in entry.items() if (m := _SPARSITY_LOG_KEY.match(k))}
            if found:
                measured = [found.get(i) for i in range(num_layers)]
                step = f" at step {entry['step']}" if "step" in entry else ""
                source = f"from the training logs{step}"
                break
    if measured is None:
        return ["–"] * num_layers, None
    if len(measured) != num_layers:
        raise ValueError(f"measured_sparsity: one value per layer ({num_layers}) is needed; got {len(measured)}")
    return ["–" if v is None else f"{v:.3f}" for v in measured], source


def _latest_eval_metrics(log_history: list[Mapping[str, Any]]) -> dict[str, Any]:
    return next((m for entry in reversed(log_history) if (m := _metrics(entry, prefix="eval_"))), {})


def _metrics(entry: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``{metric: value}`` from a Trainer log / ``evaluate()`` entry: keys starting with ``prefix``, without the
    ``eval_`` prefix, timings, epoch/step and per-layer sparsity (which has its own column)."""
    return {
        key.removeprefix("eval_"): value
        for key, value in entry.items()
        if key.startswith(prefix) and key.removeprefix("eval_") not in _NOT_METRICS and "sparsity" not in key
    }


def _hub_id(name: str | None, exclude: str | None) -> str | None:
    """``name`` if it looks like a Hub model id (not a local path, not ``exclude``)."""
    if not name or name == exclude or Path(name).exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    return name


def _framework_versions() -> list[tuple[str, str]]:
    found = []
    for name in _FRAMEWORKS:
        try:
            found.append((name, version(name)))
        except PackageNotFoundError:
            continue
    return found


def _fmt_rate(rate: Any) -> str:
    if rate is None:
        return "–"
    return "per head: " + ", ".join(_fmt(r) for r in rate) if isinstance(rate, list) else _fmt(rate)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))
