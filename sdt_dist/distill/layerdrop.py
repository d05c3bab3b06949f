"""LayerDrop: the student skips each decoder layer with probability p_l during training.

The skip decisions of a micro-step are a pure function of (seed, step, micro-step): every rank of a
tensor-parallel group and every pipeline stage draws the same decisions without communicating, and a
resumed run draws exactly what the uninterrupted run would have. A skipped layer is the identity and
produces no hidden state, hence no alignment term. The teacher's spec sets p = 0. The skippable layer
itself is the model's: `sdt_dist/model/layerdrop_layer.py`.
"""

from __future__ import annotations

import torch


def layer_probs(p: float, num_layers: int, schedule: str = "uniform") -> list[float]:
    """p_l for layers 1..L: uniform p, or linearly increasing with depth (p_L = p)."""
    if schedule == "uniform":
        return [p] * num_layers
    if schedule == "linear":
        return [p * layer / num_layers for layer in range(1, num_layers + 1)]
    raise ValueError(f"unknown LayerDrop schedule {schedule!r}")


def sample_dropped(probs: list[float], seed: int, step: int, micro_step: int = 0) -> frozenset[int]:
    """1-based numbers of the layers skipped at this micro-step (same on every rank)."""
    if not any(probs):
        return frozenset()
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro_step)
    u = torch.rand(len(probs), generator=gen, dtype=torch.float64)
    return frozenset(i + 1 for i, (ui, p) in enumerate(zip(u.tolist(), probs)) if ui < p)


def evenly_spaced_keep(num_layers: int, num_remove: int) -> list[int]:
    """Layers (1-based) kept when pruning `num_remove` of `num_layers`, evenly spaced as in LayerDrop."""
    if not 0 <= num_remove < num_layers:
        raise ValueError(f"can remove 0..{num_layers - 1} layers, asked for {num_remove}")
    keep = num_layers - num_remove
    if keep == 1:
        return [num_layers]
    return sorted({round(1 + i * (num_layers - 1) / (keep - 1)) for i in range(keep)})
