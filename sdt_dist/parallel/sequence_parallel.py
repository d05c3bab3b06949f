"""Megatron sequence parallelism: outside the attention and MLP matmuls, activations are split along the
sequence across the tensor-parallel group ([s/tp, b, d] per rank) instead of replicated.

megatron-core's column/row-parallel linears do the all-gather before and the reduce-scatter after the
matmuls; the model scatters after the embedding and the head's linear gathers before the logits. What is
left is what Megatron's own DDP does and DeepSpeed does not:
  * parameters that act on sequence-split activations (LayerNorms, row-parallel biases, the alignment
    predictors) get a gradient from this rank's tokens only: it is all-reduced across the TP group. A
    hook on the parameter does it while the gradient is produced, before DeepSpeed's own gradient hooks
    (ZeRO-2/3 reduce during backward), so it is exact under every ZeRO stage;
  * token means over sequence-split tensors (the alignment loss) are sums reduced across the TP group
    divided by the global token count (`losses.align_loss` takes this rank's slice of the [b, s] mask).
megatron-core allocates the buffers of these collectives with `torch.cuda.current_device()`;
`place_megatron_buffers_on_accelerator` points that at DeepSpeed's accelerator when it is not CUDA (on CUDA
nothing changes), so the CPU tests run megatron's own sequence-parallel code.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

# megatron-core modules whose sequence-parallel paths allocate on `torch.cuda.current_device()`
_MEGATRON_MODULES = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                     "megatron.core.utils")


class _CudaOnAccelerator:
    """`torch.cuda` as those modules see it: the current device is the accelerator's, the rest is torch.cuda."""

    def __init__(self, device: str) -> None:
        self._device = torch.device(device)

    def current_device(self) -> torch.device:
        return self._device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchView(types.ModuleType):
    def __init__(self, cuda: _CudaOnAccelerator) -> None:
        super().__init__("torch")
        self.cuda = cuda

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def place_megatron_buffers_on_accelerator() -> None:
    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        return
    view = _TorchView(_CudaOnAccelerator(accelerator.current_device_name()))
    for name in _MEGATRON_MODULES:
        importlib.import_module(name).torch = view


def is_sequence_parallel(p: torch.nn.Parameter) -> bool:
    return getattr(p, "sequence_parallel", False)


def mark_sequence_parallel(module: torch.nn.Module) -> None:
    """Mark parameters that see only this rank's tokens (e.g. the predictors) for the TP gradient all-reduce."""
    for p in module.parameters():
        p.sequence_parallel = True


def allreduce_sequence_parallel_grads(module: torch.nn.Module, tp_group: dist.ProcessGroup) -> None:
    """Sum the gradient of every marked parameter over the TP group as it is produced."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=tp_group)
        return grad

    for p in module.parameters():
        if is_sequence_parallel(p):
            p.register_hook(hook)
