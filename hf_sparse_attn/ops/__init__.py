"""Pure mathematics: reference implementations (the specification) with no transformers or Triton import."""

from hf_sparse_attn.ops.r_softmax import RSoftmax, r_softmax, r_softmax_margin

__all__ = ["RSoftmax", "r_softmax", "r_softmax_margin"]
