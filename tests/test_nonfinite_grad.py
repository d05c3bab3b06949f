"""A non-finite gradient with a finite loss is skipped under ZeRO-0 (our check) and ZeRO-3 (DeepSpeed's):
weights, Adam state and teacher bitwise unchanged, and the next step trains."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_cfg, random_batch
from tests.sdt_probe import full_student_params


def _adam_state(tm) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state

    params = [p for p in tm.engine.module.parameters() if p.requires_grad]
    if tm.engine.zero_optimization_stage() == 0:  # the torch AdamW itself
        return [tm.engine.optimizer.state[p][k].clone() for p in params for k in ("exp_avg", "exp_avg_sq", "step")]
    return [safe_get_full_optimizer_state(p, k).clone() for p in params for k in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("stage", [0, 3])
def test_non_finite_gradient_with_finite_loss_is_skipped(single_rank, stage):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg("distill.ema_tau=0.5", f"parallel.zero_stage={stage}", "train.global_batch_size=8")
    tm = SDTrainModule(cfg, single_rank)
    train_step(tm, [random_batch(cfg, 0), random_batch(cfg, 10)], 0)
    before, teacher, adam = full_student_params(tm), tm.teacher.full_parameters(), _adam_state(tm)
    param = next(p for p in tm.engine.module.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    res = train_step(tm, [random_batch(cfg, 1), random_batch(cfg, 11)], 1)  # two micro-batches: accumulation
    handle.remove()
    assert res.skipped and torch.isfinite(torch.tensor(res.loss))
    assert all(torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))
    assert all(torch.equal(a, b) for a, b in zip(teacher, tm.teacher.full_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(adam, _adam_state(tm)))
    res = train_step(tm, [random_batch(cfg, 2), random_batch(cfg, 12)], 2)
    assert not res.skipped and any(not torch.equal(a, b) for a, b in zip(before, full_student_params(tm)))
