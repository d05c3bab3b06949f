"""A step whose loss or gradient is not finite is skipped on every rank, before the optimizer moves anything.

DeepSpeed 0.19.8 finds a non-finite global gradient norm itself under ZeRO-1/2/3 and fp16: it leaves
weights and optimizer state alone and `engine.was_step_applied()` is false on every rank (the norm is
all-reduced over the data- and model-parallel groups, pipeline stages included). Two gaps remain:
  * ZeRO-0 applies AdamW to whatever gradient it holds;
  * under pipeline parallelism the loss is computed inside the engine's schedule (on the last stage), and
    the schedule's optimizer step follows with no chance for the caller to stop it.
`guard_optimizer_step` closes both where every layout passes at the accumulation boundary, the engine's
`_take_model_step` (called by `engine.step()` and by the pipeline schedule's optimizer instruction): it
combines this rank's checks into one flag, agrees on it over the world, and if any rank found something
non-finite, lets the step run without its update (counters advance, gradients are cleared).

Cost per optimizer step, where installed (ZeRO-0, or pipeline parallelism): one MAX all-reduce of a
1-element flag over the world and its host sync; under ZeRO-0 also a fused norm over this rank's gradients
(`torch._foreach_norm`: one pass over them; 1.0 ms for 1.84M values on one CPU thread, README); under PP
an `isfinite` of the last stage's 4 loss terms per micro-batch.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from sdt_dist.parallel.dims import device


def _finite_everywhere(bad: torch.Tensor) -> bool:
    """False if the 1-element 0/1 flag `bad` is 1 on any rank (one MAX all-reduce over the world)."""
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def all_finite(x: torch.Tensor) -> bool:
    """Whether `x` is finite on every rank."""
    return _finite_everywhere((~torch.isfinite(x).all()).float().reshape(1))


def _local_grads_bad(module: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(1, device=device())
    return (~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()).float().reshape(1)


@contextlib.contextmanager
def _shadow(obj, name: str, value) -> Iterator[None]:
    setattr(obj, name, value)  # an instance attribute shadows the method for this call
    try:
        yield
    finally:
        delattr(obj, name)


def _bf16_overflow(optimizer, *args, **kwargs) -> None:
    optimizer.overflow = True
    optimizer.clear_hp_grads()
    optimizer.clear_lp_grads()


@contextlib.contextmanager
def _without_update(optimizer) -> Iterator[None]:
    """Let `optimizer.step()` leave weights and optimizer state alone, each optimizer the way its own overflow
    path does it (dropping the accumulated gradients, setting `overflow`, which the engine reads):
    DeepSpeed's ZeRO-1/2 optimizer is made to find an overflow; its bf16 optimizer (ZeRO-0/1 in bf16) clears
    its gradients; torch's AdamW (ZeRO-0) does nothing (the engine clears the gradients after it)."""
    if hasattr(optimizer, "check_overflow") and hasattr(optimizer, "check_grad_overflow"):
        checks = optimizer.check_grad_overflow
        optimizer.check_grad_overflow = True
        try:
            with _shadow(optimizer, "check_overflow", lambda *args, **kwargs: setattr(optimizer, "overflow", True)):
                yield
        finally:
            optimizer.check_grad_overflow = checks
    elif hasattr(optimizer, "clear_hp_grads"):
        with _shadow(optimizer, "step", functools.partial(_bf16_overflow, optimizer)):
            yield
    else:
        with _shadow(optimizer, "step", lambda *args, **kwargs: None):
            yield


def guard_optimizer_step(engine, check_grads: bool, losses_finite: Callable[[], bool] | None = None) -> None:
    """Check before `engine`'s optimizer step: this rank's gradients (`check_grads`, for ZeRO-0) and its loss
    terms (`losses_finite`, for the pipeline's last stage, where they are computed); skip the update on every
    rank if any rank found a non-finite value. Afterwards `engine.was_step_applied()` says whether it stepped."""
    if not check_grads and losses_finite is None:
        return  # DeepSpeed checks the gradient norm itself, and the caller checks each loss before backward
    take_step = engine._take_model_step

    def guarded(*args, **kwargs) -> None:
        bad = _local_grads_bad(engine.module) if check_grads else torch.zeros(1, device=device())
        if losses_finite is not None and not losses_finite():
            bad.fill_(1.0)
        if _finite_everywhere(bad):
            take_step(*args, **kwargs)
            return
        with _without_update(engine.optimizer):
            take_step(*args, **kwargs)
        engine._step_applied = False  # torch's AdamW has no overflow flag for the engine to read

    engine._take_model_step = guarded
