"""A step whose loss or gradient is not finite is skipped on every rank, before the optimizer moves anything."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` is finite on every rank (one MAX all-reduce of a flag over the world)."""
    flag = torch.tensor([0.0 if torch.isfinite(x).all() else 1.0], device=x.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def zero0_grads_finite(engine) -> bool:
    """DeepSpeed checks the gradient norm under ZeRO-1/2/3 and fp16 only; ZeRO-0 would apply AdamW to a
    non-finite gradient. Check it here: one fused norm per rank (a pass over the gradients) and one all-reduce
    of a flag over the world, at the accumulation boundary only."""
    if engine.zero_optimization_stage() != 0:
        return True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return all_finite(torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1))


def step_without_update(engine) -> None:
    """End the accumulation boundary as `engine.step()` does (counters, zeroed gradients) without letting the
    optimizer touch weights or Adam state."""
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method for this call
    try:
        engine.step()
    finally:
        del optimizer.step
