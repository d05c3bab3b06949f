"""Schedules as pure functions of the step: learning rate, EMA tau, kappa (aligned layers), freezing.

Pure functions need no state of their own in a checkpoint and give the same values on every rank;
a resumed run recomputes them from the step.
"""

from __future__ import annotations

import math

from sdt_dist.config import DistillConfig, TrainConfig


def lr_at(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))


def tau_at(step: int, distill: DistillConfig, max_steps: int) -> float:
    """EMA decay: constant, or annealed linearly tau_start -> tau_end (data2vec); 0 with EMA off."""
    if not distill.ema:
        return 0.0
    if distill.ema_tau_end is None:
        return distill.ema_tau
    span = max(1, round(distill.ema_anneal_frac * max_steps))
    frac = min(1.0, step / span)
    return distill.ema_tau + frac * (distill.ema_tau_end - distill.ema_tau)


def frozen_layers_at(step: int, distill: DistillConfig, num_layers: int, max_steps: int) -> int:
    """floor(alpha_m * L) for the last milestone reached (milestones are fractions of max_steps)."""
    frozen = 0
    for milestone, alpha in zip(distill.freeze_milestones, distill.freeze_fractions):
        if step >= math.ceil(milestone * max_steps):
            frozen = math.floor(alpha * num_layers)
    return frozen


def aligned_layers_at(step: int, distill: DistillConfig, num_layers: int, max_steps: int,
                      frozen: int) -> list[int]:
    """kappa(t): starts with the top `kappa_start_layers` layers and ramps linearly to every unfrozen
    layer over `kappa_ramp_frac` of training."""
    if distill.lambda_sd == 0:
        return []
    ramp = round(distill.kappa_ramp_frac * max_steps)
    frac = 1.0 if ramp == 0 else min(1.0, step / ramp)
    count = distill.kappa_start_layers + math.floor(frac * (num_layers - distill.kappa_start_layers))
    first = max(frozen + 1, num_layers - count + 1)
    return list(range(first, num_layers + 1))


def layer_map(kind: str, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """f(l): which teacher layer student layer l aligns to (1-based).

    identity: l -> l (equal depth); strided: l -> l * (T / S) for an integer ratio;
    nearest: l -> round(l * T / S), for any depths.
    """
    if kind == "identity":
        if student_layers != teacher_layers:
            raise ValueError("identity alignment needs equal student and teacher depth")
        return {layer: layer for layer in range(1, student_layers + 1)}
    if kind == "strided":
        if teacher_layers % student_layers:
            raise ValueError(f"strided alignment needs teacher depth {teacher_layers} to be a multiple "
                             f"of student depth {student_layers}")
        stride = teacher_layers // student_layers
        return {layer: layer * stride for layer in range(1, student_layers + 1)}
    if kind == "nearest":
        return {layer: max(1, min(teacher_layers, round(layer * teacher_layers / student_layers)))
                for layer in range(1, student_layers + 1)}
    raise ValueError(f"unknown alignment map {kind!r}")
