"""Pure mathematics: reference implementations (the specification) with no transformers or Triton import."""

from hf_sparse_attn.ops.head_loss import head_loss
from hf_sparse_attn.ops.mixture import log_mixture, log_mixture_linear
from hf_sparse_attn.ops.monotonic import monotonic_transform
from hf_sparse_attn.ops.r_softmax import RSoftmax, r_softmax, r_softmax_margin
from hf_sparse_attn.ops.sigsoftmax import log_sigsoftmax, sigsoftmax

__all__ = [
    "RSoftmax",
    "head_loss",
    "log_mixture",
    "log_mixture_linear",
    "log_sigsoftmax",
    "monotonic_transform",
    "r_softmax",
    "r_softmax_margin",
    "sigsoftmax",
]
