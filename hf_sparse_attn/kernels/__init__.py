"""Triton kernels with their dispatchers; each kernel's reference twin lives in :mod:`hf_sparse_attn.ops`.

Importing this package never imports Triton: the dispatchers load the kernel modules only when they run them.
"""

from hf_sparse_attn.kernels.dispatch import kernel_unsupported_reason, r_softmax_attention, triton_available
from hf_sparse_attn.kernels.head_loss_dispatch import fused_head_loss

__all__ = ["fused_head_loss", "kernel_unsupported_reason", "r_softmax_attention", "triton_available"]
