"""Dispatcher for the fused LM-head loss: the Triton row kernel on CUDA, the plain-PyTorch reference elsewhere.

Both run the same chunked algorithm (:func:`hf_sparse_attn.ops.head_loss.head_loss`); they differ only in the
per-chunk row work on the `[chunk x V]` logits (loss and gradient of each row, in place), which the Triton kernel
(:mod:`hf_sparse_attn.kernels.head_loss_triton`) does in two passes over each row without temporaries. The kernel
covers ``softmax``, ``sigsoftmax`` and ``plif`` (whose pointwise transform is applied before the row work); the
mixtures ``mos``/``moss`` always take the reference row work, inside the same chunked loop. Triton is imported
only when the kernel runs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hf_sparse_attn.kernels.dispatch import KERNELS_ENV, triton_available
from hf_sparse_attn.ops.head_loss import RowKernel, head_loss, row_loss_and_grad

__all__ = ["fused_head_loss", "row_kernel"]

BACKENDS = ("auto", "triton", "reference")


def row_kernel(device: torch.device, backend: str = "auto") -> tuple[RowKernel, str | None]:
    """The row work for tensors on ``device``: ``(Triton kernel, None)`` where it runs, else ``(reference,
    reason)``. ``backend="triton"`` raises ``ValueError`` with the reason when the kernel cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    reason = None
    if backend == "reference" or (backend == "auto" and os.environ.get(KERNELS_ENV) == "0"):
        reason = "the reference backend was requested"
    elif not triton_available():
        reason = "triton is not installed (pip install 'hf-sparse-attn[triton]')"
    elif device.type != "cuda" and not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        reason = f"tensors are on {device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1 with backend='triton')"
    if reason is None:
        from hf_sparse_attn.kernels.head_loss_triton import triton_row_loss_and_grad

        return triton_row_loss_and_grad, None
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot run the fused head loss: {reason}")
    return row_loss_and_grad, reason


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """:func:`hf_sparse_attn.ops.head_loss.head_loss` with the row work chosen by :func:`row_kernel`.

    Args:
        hidden, weight, labels, bias: as in ``head_loss``.
        backend (`str`, *optional*, defaults to ``"auto"``): ``"auto"`` (Triton on CUDA, unless the environment
            sets ``HF_SPARSE_ATTN_KERNELS=0``), ``"triton"`` (raise ``ValueError`` when it cannot run) or
            ``"reference"``.
        **options: ``head``, ``theta``, ``knot_range``, ``mixture``, ``mixture_params``, ``ignore_index``,
            ``label_smoothing``, ``reduction``, ``chunk_size`` of ``head_loss``.

    Returns:
        `torch.Tensor`: the scalar loss.
    """
    if "rows" in options:
        raise TypeError("fused_head_loss chooses the row work itself; pass backend= instead of rows=")
    rows, _ = row_kernel(weight.device, backend)
    return head_loss(hidden, weight, labels, bias, rows=rows, **options)
