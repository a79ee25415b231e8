"""What the fine-tuning recipes in ``recipes/`` share: command-line arguments, model loading and patching, the
sparsity callbacks, and the train / save / evaluate sequence.

Every recipe parses ``(ModelArguments, <its data arguments>, SampleArguments, PatchArguments, TrainingArguments)``
with ``HfArgumentParser``, so all patch options are command-line flags (``--sparsity 0.5 --head moss ...``). The
patch config is logged and lands in the checkpoint's ``config.json`` (``hf_sparse_attn`` key); a LoRA run saves
only an adapter, so the patch is written beside it as :data:`PATCH_FILE`.

Examples::

    parser = HfArgumentParser((ModelArguments, TextArguments, SampleArguments, PatchArguments, TrainingArguments))
    model_args, data_args, samples, patch_args, training_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = load_tokenizer(model_args)
    model = prepare_model(load_model(AutoModelForCausalLM, model_args, tokenizer), patch_args)
    trainer = Trainer(model=model, args=training_args, ...)
    add_sparsity_callbacks(trainer, patch_args, eval_dataset)
    train_and_evaluate(trainer, perplexity=True)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainingArguments

from hf_sparse_attn.config import HEAD_NAMES, PatchConfig, Sparsity
from hf_sparse_attn.patch import get_patch_config, patch_model
from hf_sparse_attn.recipe_data import read_text_lines, split_lines, token_blocks
from hf_sparse_attn.training import SparsityLoggingCallback, SparsityScheduleCallback, add_first

logger = logging.getLogger(__name__)

#: file written next to a LoRA adapter: the keyword arguments of ``patch_model`` that rebuild the patched base
PATCH_FILE = "hf_sparse_attn_patch.json"
#: spellings of "keep softmax in this layer" accepted in ``--sparsity`` lists
_SOFTMAX_WORDS = ("none", "softmax", "")


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


@dataclass
class SampleArguments:
    """Caps for short runs."""

    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N evaluation examples"})


@dataclass
class TextArguments:
    """Language-modelling data: text files, cut into blocks of ``block_size`` tokens."""

    train_file: list[str] = field(metadata={"help": "training text file(s): .txt, .tokens, or gzip-compressed .gz"})
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "evaluation text file(s); default: hold out the end of the training text"}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "without --validation_file: percentage of training lines held out"}
    )
    block_size: int = field(default=128, metadata={"help": "tokens per training example"})


def text_datasets(
    data_args: TextArguments, samples: SampleArguments, tokenizer: PreTrainedTokenizerBase, *, causal: bool
):
    """``(train, eval)`` ``datasets.Dataset`` of ``input_ids`` blocks, capped by ``--max_train_samples`` /
    ``--max_eval_samples`` (counted in blocks). For a causal LM the blocks are also the ``labels`` (the model shifts
    them); a masked LM gets its labels from the masking collator. ``eval`` is None for an empty evaluation text."""
    import datasets

    train_lines = read_text_lines(data_args.train_file)
    if data_args.validation_file:
        eval_lines = read_text_lines(data_args.validation_file)
    else:
        train_lines, eval_lines = split_lines(train_lines, data_args.validation_split_percentage)
    parts = ((train_lines, samples.max_train_samples), (eval_lines, samples.max_eval_samples))
    blocks = [token_blocks(lines, tokenizer, data_args.block_size, limit) for lines, limit in parts]
    if not blocks[0]:
        raise ValueError(f"--train_file: no block of {data_args.block_size} tokens; lower --block_size")
    columns = ("input_ids", "labels") if causal else ("input_ids",)
    return tuple(datasets.Dataset.from_dict(dict.fromkeys(columns, b)) if b else None for b in blocks)


@dataclass
class PatchArguments:
    """The ``patch_model`` options, a warm-up schedule for the rate, sparsity logging, and LoRA."""

    sparsity: str | None = field(
        default=None,
        metadata={
            "help": "r-softmax rate (fraction of valid keys set to 0): one float in [0, 1] for every layer, or a comma "
            "list with one entry per layer where 'none' keeps softmax (e.g. none,none,0.5,0.5). Omit for softmax."
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
    entries = [entry.strip().lower() for entry in text.split(",")]
    rates: list[float | None] = []
    for entry in entries:
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


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    """The tokenizer of ``--tokenizer_name`` or ``--model_name_or_path``; GPT-2's lack of a padding token is filled
    with its end-of-text token."""
    name = model_args.tokenizer_name or model_args.model_name_or_path
    if name is None:
        raise ValueError("--tokenizer_name is required when training from scratch with --model_type")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    auto_class: type, model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, **config_kwargs: Any
) -> transformers.PreTrainedModel:
    """``auto_class`` (e.g. ``AutoModelForCausalLM``) from ``--model_name_or_path``, or built from
    ``--model_type`` / ``--config_overrides`` with the tokenizer's vocabulary. ``config_kwargs`` (``num_labels``,
    ...) go to the config."""
    if model_args.model_name_or_path is not None:
        model = auto_class.from_pretrained(model_args.model_name_or_path, **config_kwargs)
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

        from hf_sparse_attn.lora import lora_config

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


def train_and_evaluate(trainer: Trainer, *, perplexity: bool = False) -> dict[str, float]:
    """Train (resuming from ``--resume_from_checkpoint`` if given), save the model, tokenizer and
    ``trainer_state.json``, then evaluate when there is an evaluation set. Returns the evaluation metrics (plus
    ``eval_perplexity`` = exp(eval_loss) when ``perplexity``)."""
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    trainer.save_model()
    _save_patch_beside_adapter(trainer)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics: dict[str, float] = {}
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        if perplexity and "eval_loss" in metrics:  # absent when --dataloader_drop_last drops every batch
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))  # exp(>709) overflows a float
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return metrics


def _save_patch_beside_adapter(trainer: Trainer) -> None:
    """PEFT saves no ``config.json``; write the patch so that the base model can be patched before loading the
    adapter: ``patch_model(base, **json.load(open(PATCH_FILE)))``."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "get_base_model") or not trainer.is_world_process_zero():
        return
    config = get_patch_config(model.get_base_model())
    if config is None:
        return
    options = {k: v for k, v in config.to_dict().items() if k != "version"}
    with open(os.path.join(trainer.args.output_dir, PATCH_FILE), "w") as f:
        json.dump(options, f, indent=2)
