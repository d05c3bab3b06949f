"""Accelerators sdt-plan knows: memory per device and dense peak FLOP/s by compute dtype (vendor datasheets:
A100 SXM 80GB 312 TFLOP/s bf16, 19.5 fp32; H100 SXM 80GB 989 bf16, 67 fp32, without sparsity)."""

from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes per device
    peak_flops: dict[int, float]  # compute-dtype bytes -> dense FLOP/s; empty: no throughput estimate
    reserve: int = 4 * GiB  # CUDA context, NCCL buffers, allocator fragmentation: not available to tensors

    @property
    def usable(self) -> int:
        return self.memory - self.reserve


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device(name: str, ranks_per_node: int) -> Device:
    if name == "a100-80gb":
        return Device(name, 80 * GiB, {2: 312e12, 4: 19.5e12})
    if name == "h100-80gb":
        return Device(name, 80 * GiB, {2: 989e12, 4: 67e12})
    if name == "cpu":  # this machine's RAM shared by the node's ranks; no FLOP/s figure to assume
        return Device(name, host_memory() // ranks_per_node, {}, reserve=GiB // 2)
    raise ValueError(f"unknown device {name!r} (a100-80gb, h100-80gb, cpu)")


DEVICES = ("a100-80gb", "h100-80gb", "cpu")
