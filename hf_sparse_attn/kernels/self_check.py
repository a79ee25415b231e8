"""First-use self-check of the r-softmax attention kernel: users are never routed to an unverified kernel.

``r_softmax_attention(..., backend="auto")`` runs the Triton kernel for a (device, dtype, head dim) only after
:func:`kernel_verified` said yes. The first call per (device, dtype, head dim) runs the kernel and the reference on a
small random problem and compares outputs and gradients; on a mismatch (or an exception from the kernel: a compile
error, too little shared memory) it warns once and that combination takes the reference from then on. The check
costs one kernel compilation plus milliseconds, once per process and combination.

The criterion is FlashAttention's: with ``ref64`` the reference in float64 on the same (dtype-rounded) inputs and
``ref`` the reference in the input dtype, each of ``o, dq, dk, dv`` must satisfy

    max|kernel - ref64| <= 2 max|ref - ref64| + eps(dtype) max|ref64|,

i.e. the kernel may be at most twice as far from the exact result as the plain dtype computation, plus one unit of
rounding of the result (which covers fp32, where both errors are rounding noise). A wrong threshold, a wrong mask
or a wrong gradient term moves results by far more.

``HF_SPARSE_ATTN_KERNELS=1`` skips the check (the kernel wherever it applies), ``=0`` always uses the reference;
``backend="triton"`` never checks (it is the explicit request of tests and benchmarks).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["SelfChecks", "compare_with_reference", "kernel_verified"]

#: ``kernel(q, k, v, key_padding, rates, causal, scale, eps) -> o [B, T, H, D]``, as
#: :class:`~hf_sparse_attn.kernels.r_softmax_attention_triton.RSoftmaxAttentionFunction` ``.apply``
KernelFunction = Callable[..., torch.Tensor]

#: the problem: batch, heads, queries = keys. 80 spans two row blocks and two key blocks with ragged tails at the
#: kernel's block sizes (32-128), so tile edges, masking and cross-block reductions are all exercised
BATCH, HEADS, LENGTH = 2, 2, 80
#: keys padded in batch row 1 (row 0 has none), and one rate per head
PADDED_KEYS = 23
RATES = (0.3, 0.8)
EPS = 1e-8


def _kernel_function() -> KernelFunction:
    from hf_sparse_attn.kernels.r_softmax_attention_triton import RSoftmaxAttentionFunction

    return RSoftmaxAttentionFunction.apply


def _run(function: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...], grad: torch.Tensor) -> list:
    """``[o, dq, dk, dv]`` of ``function()`` for the upstream gradient ``grad``."""
    for tensor in inputs:
        tensor.grad = None
    out = function()
    out.backward(grad.to(out.dtype))
    return [out.detach(), *(tensor.grad for tensor in inputs)]


def compare_with_reference(
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    kernel: KernelFunction | None = None,
    *,
    seed: int = 0,
) -> str | None:
    """Run ``kernel`` and the reference on small random problems; None when they agree, else what differs.

    Two problems share the inputs (``[2, 2, 80, head_dim]``, 23 padded keys in batch row 1, rates 0.3 and 0.8 per
    head): key padding alone, and key padding with the causal pattern. Each compares the output and the gradients of
    ``q``, ``k``, ``v`` for one random upstream gradient with the criterion of the module docstring. The inputs come
    from a private generator (the global RNG is untouched); autocast is off and gradients are on whatever the
    caller's context.

    Args:
        device, dtype, head_dim: the combination to check.
        kernel: ``kernel(q, k, v, key_padding, rates, causal, scale, eps) -> o [B, T, H, D]``; defaults to the
            Triton kernel (``RSoftmaxAttentionFunction.apply``).
        seed: seed of the inputs.

    Returns:
        None, or a message naming the case and the tensor that failed (or the exception the kernel raised).
    """
    device = torch.device(device)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        return _compare(device, dtype, head_dim, kernel or _kernel_function(), seed)


def _compare(device: torch.device, dtype: torch.dtype, head_dim: int, kernel: KernelFunction, seed: int) -> str | None:
    """:func:`compare_with_reference` inside its context (gradients on, no inference mode, no autocast)."""
    from hf_sparse_attn.kernels.dispatch import r_softmax_attention

    generator = torch.Generator().manual_seed(seed)
    shape = (BATCH, HEADS, LENGTH, head_dim)
    base = [torch.randn(shape, generator=generator) for _ in range(3)]  # q, k, v
    grad = torch.randn(BATCH, LENGTH, HEADS, head_dim, generator=generator).to(device)
    padding = torch.ones(BATCH, LENGTH, dtype=torch.bool)
    padding[1, LENGTH - PADDED_KEYS :] = False
    padding = padding.to(device)
    rates = torch.tensor(RATES, dtype=torch.float32).to(device)
    scale = head_dim**-0.5
    low = [x.to(device, dtype).requires_grad_() for x in base]  # the inputs as the kernel sees them
    exact = [x.detach().double().requires_grad_() for x in low]  # the same values in float64
    for causal in (False, True):
        case = "causal + key padding" if causal else "key padding"
        offset = 0 if causal else None

        def reference(inputs: list[torch.Tensor], offset: int | None = offset) -> torch.Tensor:
            out, _ = r_softmax_attention(
                *inputs, None, rates, scale, EPS, key_padding=padding, causal_offset=offset, backend="reference"
            )
            return out

        try:
            got = _run(lambda c=causal: kernel(*low, padding, rates, c, scale, EPS), low, grad)
        except Exception as error:  # noqa: BLE001 - any failure of the kernel means "do not use it"
            return f"{case}: the kernel raised {type(error).__name__}: {error}"
        plain = _run(lambda: reference(low), low, grad)
        truth = _run(lambda: reference(exact), exact, grad)
        for name, value, plain_value, true in zip(["o", "dq", "dk", "dv"], got, plain, truth, strict=True):
            if value is None or value.shape != true.shape:
                return f"{case}: {name} is missing or has the wrong shape"
            error = (value.double() - true).abs().max().item()
            allowed = (
                2 * (plain_value.double() - true).abs().max().item() + torch.finfo(dtype).eps * true.abs().max().item()
            )
            if not error <= allowed:  # also catches NaN
                return f"{case}: {name} differs from the float64 reference by {error:.3g} (allowed {allowed:.3g})"
    return None


class SelfChecks:
    """Verdicts of :func:`compare_with_reference` per (device, dtype, head dim), each computed once.

    Args:
        kernel: the kernel function to check (default: the Triton kernel); the dispatcher uses the module-level
            instance :data:`CHECKS`.
    """

    def __init__(self, kernel: KernelFunction | None = None) -> None:
        self.kernel = kernel
        self.verdicts: dict[tuple[torch.device, torch.dtype, int], bool] = {}

    @torch.compiler.disable  # runs once, eagerly; never traced into a compiled graph
    def verified(self, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether the kernel passed the self-check for this combination (running it on the first call; a
        failure warns once)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = (device, dtype, head_dim)
        if key not in self.verdicts:
            problem = compare_with_reference(device, dtype, head_dim, self.kernel)
            if problem is not None:
                warnings.warn(
                    f"hf_sparse_attn: the r-softmax attention kernel failed its self-check for {dtype}, head dim "
                    f"{head_dim} on {device} ({problem}); that combination uses the reference path from now on "
                    "(same results, more time and memory). Please report this with your GPU, torch and triton "
                    "versions. HF_SPARSE_ATTN_KERNELS=1 forces the kernel, =0 always uses the reference.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.verdicts[key] = problem is None
        return self.verdicts[key]


#: the dispatcher's verdicts (one per process)
CHECKS = SelfChecks()


def kernel_verified(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether ``backend="auto"`` may use the kernel for this combination (see :class:`SelfChecks`)."""
    return CHECKS.verified(device, dtype, head_dim)
