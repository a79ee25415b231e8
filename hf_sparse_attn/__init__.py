"""hf_sparse_attn: r-softmax sparse attention and softmax-bottleneck-free LM heads for HF Transformers.

One call, :func:`patch_model`, turns a pretrained BERT, RoBERTa or GPT-2 into a model whose self-attention uses
r-softmax (arXiv 2304.05243) and whose LM head can be sigsoftmax, a mixture of softmaxes / sigsoftmaxes or a
learnable monotonic logit transform. See README.md.
"""

__version__ = "0.1.0"

from hf_sparse_attn.attention import returning_weights  # noqa: E402
from hf_sparse_attn.config import PatchConfig  # noqa: E402
from hf_sparse_attn.patch import from_pretrained, get_patch_config, patch_model, set_sparsity, unpatch_model  # noqa: E402
from hf_sparse_attn.sparsity import attention_sparsity, measure_sparsity  # noqa: E402

__all__ = [
    "PatchConfig",
    "__version__",
    "attention_sparsity",
    "from_pretrained",
    "get_patch_config",
    "measure_sparsity",
    "patch_model",
    "returning_weights",
    "set_sparsity",
    "unpatch_model",
]
