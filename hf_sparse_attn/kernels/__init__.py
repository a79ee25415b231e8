"""Triton kernels with their dispatchers; each kernel's reference twin lives in :mod:`hf_sparse_attn.ops`.

Importing this package never imports Triton: the dispatchers load the kernel modules only when they run them.
"""

from hf_sparse_attn.kernels.dispatch import kernel_unsupported_reason, r_softmax_attention, triton_available

__all__ = ["kernel_unsupported_reason", "r_softmax_attention", "triton_available"]
