"""A torch-function mode that counts host reads (device syncs) and large allocations, for the no-sync tests."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class DeviceTraffic(TorchFunctionMode):
    """Counts, among the torch calls made inside the block, reads of tensor data on the host (each one a device
    sync on CUDA; ``tolist`` does not reach the dispatcher, so a function mode, not a dispatch mode) and new tensors
    whose storage holds at least ``limit_bytes`` (views of the given inputs do not count)."""

    HOST_READS = frozenset(
        {
            torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
            torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu,
            torch.Tensor.nonzero, torch.nonzero, torch.Tensor.any, torch.Tensor.all, torch.any, torch.all,
        }
    )  # fmt: skip

    def __init__(self, limit_bytes: int, inputs: tuple[torch.Tensor, ...]) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.input_storages = {x.untyped_storage().data_ptr() for x in inputs}
        self.host_reads: list[str] = []
        self.large: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            self.host_reads.append(func.__name__)
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() >= self.limit_bytes and storage.data_ptr() not in self.input_storages:
                self.large.append(getattr(func, "__name__", str(func)))
        return out
