"""Model FLOPs utilisation: the model FLOP/s a run achieves per device over the device's peak.

The model FLOPs of a step are those of `eval/compute.py` (student forward/backward over the layers that ran
and are trainable, the EMA teacher's forward; Kaplan et al.'s count, norms and softmax left out). The peak
per device is, in this order: `logging.peak_flops`; a known dense figure for the accelerator in bf16/fp16
(A100, H100, H200); otherwise a matmul in the compute dtype measured once at start (CPU, other devices):
on a CPU that is the reachable peak, so the MFU says how close a run is to what its matmuls could do.
"""

from __future__ import annotations

import time

import torch

# dense bf16/fp16 tensor-core peaks (FLOP/s) from the vendor data sheets, by a substring of the device name
KNOWN_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def measured_matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the fastest of a few n x n matmuls (about 0.1-0.5 s on a CPU core)."""
    from deepspeed.accelerator import get_accelerator

    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        get_accelerator().synchronize()
        t0 = time.perf_counter()
        a @ b
        get_accelerator().synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(dtype: torch.dtype, device: torch.device, override: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override is not None:
        return override, "logging.peak_flops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS:
            if key in name:
                return value, f"{name}, {dtype} data sheet"
    return measured_matmul_peak(dtype, device), f"measured {dtype} matmul on {device.type}"


def mfu(model_flops: float, seconds: float, world_size: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation of a step that did `model_flops` (all ranks) in `seconds` on `world_size` devices."""
    return model_flops / (max(seconds, 1e-12) * world_size * peak_per_device)
