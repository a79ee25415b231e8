"""What the fine-tuning recipes in ``recipes/`` share: command-line arguments, model loading and patching, the
sparsity callbacks, and the train / save / evaluate sequence.

Every recipe parses ``(ModelArguments, <its data arguments>, SampleArguments, PatchArguments, TrainingArguments)``
with ``HfArgumentParser`` -- from the command line, or from a single ``.json`` file of the same names, as the
transformers examples do -- so all patch options are flags (``--sparsity 0.5 --head moss ...``). Model and data
options carry the names of ``run_glue.py`` / ``run_clm.py`` / ``run_mlm.py`` (``--model_revision``, ``--token``,
``--cache_dir``, ``--dataset_name``, ...). ``--do_train`` / ``--do_eval`` / ``--do_predict`` choose what runs, and
training resumes from the last ``checkpoint-*`` in ``--output_dir``. The patch config is logged and lands in the
checkpoint's ``config.json`` (``hf_sparse_attn`` key); a LoRA run saves only an adapter, so the patch is written
beside it as :data:`~hf_sparse_attn.patch.PATCH_FILE`, and ``hf_sparse_attn.from_pretrained(output_dir)`` returns the
patched PEFT model.

Examples::

    parser = HfArgumentParser((ModelArguments, TextArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parse_arguments(parser, argv)
    tokenizer = load_tokenizer(model_args)
    model = prepare_model(load_model(AutoModelForCausalLM, model_args, tokenizer), patch_args)
    trainer = Trainer(model=model, args=training_args, ...)
    add_sparsity_callbacks(trainer, patch_args, eval_dataset)
    train_and_evaluate(trainer)
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_sparse_attn.config import CONFIG_KEY, HEAD_NAMES, PatchConfig, Sparsity
from hf_sparse_attn.patch import from_pretrained, get_patch_config, patch_model, save_adapter_patch
from hf_sparse_attn.publishing import hub
from hf_sparse_attn.training.callbacks import (
    AdapterPatchCallback,
    SparsityLoggingCallback,
    SparsityScheduleCallback,
    add_first,
)
from hf_sparse_attn.training.data import group_texts, load_text

logger = logging.getLogger(__name__)

#: spellings of "keep softmax in this layer" accepted in ``--sparsity`` lists
_SOFTMAX_WORDS = ("none", "softmax")


@dataclass
class ModelArguments:
    """Which model to start from: a pretrained checkpoint, or a fresh one built from a model type."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub name or local path of a pretrained model, e.g. roberta-base, gpt2"}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "train from scratch: bert, roberta or gpt2 (when --model_name_or_path is not given)"},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "from scratch: config values to override, e.g. 'n_layer=2,n_embd=64,n_head=2'"},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer name or path; defaults to --model_name_or_path"}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "where to store models and datasets downloaded from the Hub"}
    )
    model_revision: str = field(
        default="main", metadata={"help": "model version on the Hub: a branch name, tag name or commit id"}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models and datasets (default: the `hf auth login` one)"}
    )

    def hub_kwargs(self) -> dict[str, Any]:
        """``cache_dir``, ``revision`` and ``token`` for ``from_pretrained``."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token}


@dataclass
class SampleArguments:
    """Caps for short runs."""

    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N evaluation examples"})
    max_predict_samples: int | None = field(
        default=None, metadata={"help": "use only the first N test examples (--do_predict)"}
    )


def first(dataset: Any, limit: int | None) -> Any:
    """The first ``limit`` rows of a ``datasets.Dataset`` (all of them when ``limit`` is None)."""
    return dataset if limit is None else dataset.select(range(min(limit, dataset.num_rows)))


@dataclass
class TextArguments:
    """Language-modelling data: a Hub dataset or text files, cut into blocks of ``block_size`` tokens."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (e.g. wikitext) or local dataset folder, instead of --train_file"},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "its configuration (e.g. wikitext-2-raw-v1)"}
    )
    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "training file(s): .txt, .tokens, .raw (one row per line), .csv, .tsv, .json; .gz too"},
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "evaluation file(s); default: hold out the end of the training data"}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "without a validation split: the last N percent of the training rows are held out"},
    )
    block_size: int = field(
        default=128,
        metadata={"help": "tokens per example (run_mlm's --max_seq_length)", "aliases": ["--max_seq_length"]},
    )
    keep_linebreaks: bool = field(default=True, metadata={"help": "keep the line breaks of .txt files"})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes for tokenising and grouping (datasets.map num_proc)"}
    )


def text_datasets(
    data_args: TextArguments,
    samples: SampleArguments,
    tokenizer: PreTrainedTokenizerBase,
    model_args: ModelArguments,
    *,
    causal: bool,
):
    """``(train, eval)`` ``datasets.Dataset`` of token blocks (:func:`~hf_sparse_attn.training.data.group_texts`),
    capped by ``--max_train_samples`` / ``--max_eval_samples`` (counted in blocks). Raises ``ValueError`` when the
    training or the validation data has no complete block."""
    raw = load_text(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        keep_linebreaks=data_args.keep_linebreaks,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    blocks = group_texts(
        raw, tokenizer, data_args.block_size, causal=causal, num_proc=data_args.preprocessing_num_workers
    )
    train, evaluation = (
        first(blocks["train"], samples.max_train_samples),
        first(blocks["validation"], samples.max_eval_samples),
    )
    for split, dataset in (("training", train), ("validation", evaluation)):
        if dataset.num_rows == 0:
            raise ValueError(
                f"--block_size {data_args.block_size}: the {split} data has no complete block; lower --block_size"
            )
    return train, evaluation


@dataclass
class PatchArguments:
    """The ``patch_model`` options, a warm-up schedule for the rate, sparsity logging, and LoRA."""

    sparsity: str | None = field(
        default=None,
        metadata={
            "help": "r-softmax rate (fraction of valid keys set to 0): one float in [0, 1] for every layer, or a comma "
            "list with one entry per layer where 'none' keeps softmax (e.g. none,none,0.5,0.5), or JSON such as "
            "the 'rates' of a calibration.json (per-head lists allowed). Omit for softmax."
        },
    )
    sparsity_warmup_steps: int = field(
        default=0, metadata={"help": "raise the rate linearly from 0 to --sparsity over this many optimizer steps"}
    )
    sparsity_probe_size: int = field(
        default=4,
        metadata={
            "help": "evaluation examples in the probe batch whose sparsity is logged every logging_steps (0: off)"
        },
    )
    head: str | None = field(
        default=None, metadata={"help": "LM head (causal / masked LM only)", "choices": HEAD_NAMES}
    )
    num_mixtures: int = field(
        default=PatchConfig.num_mixtures, metadata={"help": "mixture components K of the mos / moss heads"}
    )
    num_knots: int = field(default=PatchConfig.num_knots, metadata={"help": "knots of the plif head"})
    knot_range: float = field(
        default=PatchConfig.knot_range, metadata={"help": "the plif knots span [-knot_range, knot_range]"}
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (updates are scaled by alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})

    def __post_init__(self) -> None:
        self.target_sparsity()  # a malformed --sparsity fails at parse time, before any data or model is loaded

    def target_sparsity(self) -> Sparsity:
        """``--sparsity`` parsed: None, one float, or a per-layer list."""
        return parse_sparsity(self.sparsity)


def parse_sparsity(text: str | None) -> Sparsity:
    """Parse ``--sparsity``: ``"0.5"`` -> 0.5, ``"none"`` -> None, ``"none,0.3,0.5"`` -> [None, 0.3, 0.5].

    Ranges are checked by ``patch_model``; a word that is neither a number nor ``none`` raises ``ValueError``.

    Examples::

        >>> parse_sparsity("none,none,0.5,0.5")
        [None, None, 0.5, 0.5]
    """
    if text is None:
        return None
    if text.lstrip().startswith(("[", "{")):  # JSON, e.g. the per-head rates of `hf-sparse-attn calibrate`
        return json.loads(text)
    entries = [entry.strip().lower() for entry in text.split(",")]
    rates: list[float | None] = []
    for position, entry in enumerate(entries):
        if not entry:
            raise ValueError(
                f"--sparsity {text!r}: entry {position} is empty; give a float in [0, 1], 'none', or a comma list of "
                "those with one entry per layer (omit --sparsity for plain softmax)"
            )
        if entry in _SOFTMAX_WORDS:
            rates.append(None)
            continue
        try:
            rates.append(float(entry))
        except ValueError:
            raise ValueError(
                f"--sparsity: {entry!r} is not a rate; give a float in [0, 1], 'none', or a comma list of those"
            ) from None
    return rates[0] if len(rates) == 1 else rates


def setup_logging(training_args: TrainingArguments) -> None:
    """Log the recipe's own messages (patch config, LoRA) at info level on the main process, warnings elsewhere;
    transformers logs at ``--log_level`` / ``--log_level_replica``."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def parse_arguments(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """The dataclasses from ``argv`` (default ``sys.argv[1:]``), or from a single ``.json`` file of the same option
    names (``python recipes/classification.py args.json``), as the transformers examples accept them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(argv)


def check_stages(training_args: TrainingArguments, *, predict: bool = True) -> None:
    """``ValueError`` when none of ``--do_train`` / ``--do_eval`` / ``--do_predict`` is set (there is nothing to do),
    or ``--do_predict`` is set where the recipe has no test-set prediction (``predict=False``)."""
    if not predict and training_args.do_predict:
        raise ValueError("--do_predict: this recipe has no test-set prediction; use --do_eval")
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        stages = "--do_train, --do_eval" + (" and/or --do_predict" if predict else " or both")
        raise ValueError(f"nothing to do: pass {stages}")


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """The checkpoint training resumes from: ``--resume_from_checkpoint`` if given, else the last ``checkpoint-*``
    folder in ``--output_dir`` (as the transformers examples do), else None. Start afresh with a new output_dir."""
    if training_args.resume_from_checkpoint is not None:
        return training_args.resume_from_checkpoint
    if not os.path.isdir(training_args.output_dir):
        return None
    last = get_last_checkpoint(training_args.output_dir)
    if last is not None:
        logger.info("resuming training from %s (give another --output_dir to start afresh)", last)
    return last


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer of ``--tokenizer_name`` or ``--model_name_or_path``; GPT-2's lack of a padding token is filled
    with its end-of-text token."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        raise ValueError("--tokenizer_name is required when training from scratch with --model_type")
    tokenizer = AutoTokenizer.from_pretrained(name, **model_args.hub_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    auto_class: type, model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, **config_kwargs: Any
) -> transformers.PreTrainedModel:
    """``auto_class`` (e.g. ``AutoModelForCausalLM``) from ``--model_name_or_path``, or built from
    ``--model_type`` / ``--config_overrides`` with the tokenizer's vocabulary. ``config_kwargs`` (``num_labels``,
    ...) go to the config. A checkpoint saved from a patched model (e.g. an earlier run of a recipe, for
    ``--do_eval`` / ``--do_predict`` or further training) comes back patched, with its head."""
    if model_args.model_name_or_path is not None:
        hub = model_args.hub_kwargs()
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub)
        load = from_pretrained if getattr(config, CONFIG_KEY, None) is not None else auto_class.from_pretrained
        model = load(model_args.model_name_or_path, **hub, **config_kwargs)
    elif model_args.model_type is not None:
        special_ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        config = AutoConfig.for_model(model_args.model_type, vocab_size=len(tokenizer), **special_ids, **config_kwargs)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = auto_class.from_config(config)
    else:
        raise ValueError("give --model_name_or_path (a pretrained model) or --model_type (train from scratch)")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def prepare_model(model: nn.Module, patch_args: PatchArguments) -> nn.Module:
    """Patch ``model`` as the arguments say, log the patch config, and wrap it with LoRA when ``--lora`` is set.

    The model is patched with the *target* rate; with a warm-up, :class:`SparsityScheduleCallback` lowers it to the
    scheduled rate when training starts.
    """
    sparsity = patch_args.target_sparsity()
    if sparsity is not None or patch_args.head is not None:
        patch_model(
            model,
            sparsity=sparsity,
            head=patch_args.head,
            num_mixtures=patch_args.num_mixtures,
            num_knots=patch_args.num_knots,
            knot_range=patch_args.knot_range,
        )
        logger.info("hf_sparse_attn patch config: %s", json.dumps(get_patch_config(model).to_dict()))
    if patch_args.lora:
        from peft import get_peft_model

        from hf_sparse_attn.training.lora import lora_config

        config = lora_config(model, r=patch_args.lora_r, alpha=patch_args.lora_alpha, dropout=patch_args.lora_dropout)
        model = get_peft_model(model, config)
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("LoRA %s: %d of %d parameters trainable", config.target_modules, trainable, total)
    return model


def add_sparsity_callbacks(trainer: Trainer, patch_args: PatchArguments, probe_dataset: Any = None) -> None:
    """Install the warm-up schedule (when ``--sparsity_warmup_steps`` > 0) and per-layer sparsity logging on a probe
    batch of the first ``--sparsity_probe_size`` examples of ``probe_dataset`` (collated by the trainer's
    collator), for a model patched with a rate."""
    sparsity = patch_args.target_sparsity()
    if sparsity is None:
        return
    if patch_args.sparsity_warmup_steps > 0:
        trainer.add_callback(SparsityScheduleCallback(sparsity, patch_args.sparsity_warmup_steps))
    size = min(patch_args.sparsity_probe_size, len(probe_dataset) if probe_dataset is not None else 0)
    if size > 0:
        probe = trainer.data_collator([probe_dataset[i] for i in range(size)])
        add_first(trainer, SparsityLoggingCallback(probe))


def train_and_evaluate(trainer: Trainer) -> dict[str, float]:
    """With ``--do_train``: train (resuming as :func:`resume_checkpoint` says), save the model, tokenizer and
    ``trainer_state.json``. With ``--do_eval``: evaluate on the trainer's evaluation set. Metrics go to the log and
    to ``{train,eval}_results.json`` / ``all_results.json``. Returns the evaluation metrics (empty without
    ``--do_eval``)."""
    args = trainer.args
    if args.push_to_hub:  # save_model() then pushes; the card it writes gets our section
        hub.bind_trainer_card(trainer)
    if args.do_train:
        trainer.add_callback(AdapterPatchCallback())  # checkpoint-N folders of a LoRA run reload patched too
        result = trainer.train(resume_from_checkpoint=resume_checkpoint(args))
        trainer.save_model()
        _save_patch_beside_adapter(trainer)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    metrics: dict[str, float] = {}
    if args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return metrics


def _save_patch_beside_adapter(trainer: Trainer) -> None:
    """PEFT saves no ``config.json``; write the patch beside the adapter (:func:`save_adapter_patch`), so that
    ``hf_sparse_attn.from_pretrained(output_dir)`` returns the patched PEFT model."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "get_base_model") and trainer.is_world_process_zero():
        save_adapter_patch(model, trainer.args.output_dir)
