"""hf_sparse_attn: r-softmax sparse attention and softmax-bottleneck-free LM heads for HF Transformers.

One call, :func:`patch_model`, turns a pretrained BERT, RoBERTa or GPT-2 into a model whose self-attention uses
r-softmax (arXiv 2304.05243) and whose LM head can be sigsoftmax, a mixture of softmaxes / sigsoftmaxes or a
learnable monotonic logit transform. See README.md.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

#: public name -> module defining it. The modules import torch and transformers (seconds), so they are imported
#: on first use (PEP 562): `hf-sparse-attn --help` and the light commands never load them.
_EXPORTS = {
    "returning_weights": "hf_sparse_attn.attention",
    "calibrate": "hf_sparse_attn.calibrate",
    "PatchConfig": "hf_sparse_attn.config",
    "from_pretrained": "hf_sparse_attn.patch",
    "get_patch_config": "hf_sparse_attn.patch",
    "patch_model": "hf_sparse_attn.patch",
    "save_adapter_patch": "hf_sparse_attn.patch",
    "set_sparsity": "hf_sparse_attn.patch",
    "unpatch_model": "hf_sparse_attn.patch",
    "attention_sparsity": "hf_sparse_attn.sparsity",
    "measure_sparsity": "hf_sparse_attn.sparsity",
}

if TYPE_CHECKING:
    from hf_sparse_attn.attention import returning_weights
    from hf_sparse_attn.calibrate import calibrate
    from hf_sparse_attn.config import PatchConfig
    from hf_sparse_attn.patch import (
        from_pretrained,
        get_patch_config,
        patch_model,
        save_adapter_patch,
        set_sparsity,
        unpatch_model,
    )
    from hf_sparse_attn.sparsity import attention_sparsity, measure_sparsity


def __getattr__(name: str) -> Any:
    """A public name of :data:`_EXPORTS`, or a subpackage or module (``hf_sparse_attn.training`` after
    ``import hf_sparse_attn``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'hf_sparse_attn' has no attribute {name!r}")
    globals()[name] = value
    return value


if "transformers" in sys.modules:
    # a transformers user: register the attention implementation now, as an eager import would, so that
    # `from_pretrained(..., attn_implementation="hf_sparse_attn")` works right after `import hf_sparse_attn`;
    # every function above registers it too
    importlib.import_module("hf_sparse_attn.attention")

__all__ = [
    "PatchConfig",
    "__version__",
    "attention_sparsity",
    "calibrate",
    "from_pretrained",
    "get_patch_config",
    "measure_sparsity",
    "patch_model",
    "returning_weights",
    "save_adapter_patch",
    "set_sparsity",
    "unpatch_model",
]
