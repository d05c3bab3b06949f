"""`train.optimizer_impl` picks torch AdamW's kernel. Every kernel trains the same model up to float rounding:
under ZeRO-0 (torch's AdamW steps the parameters themselves) and ZeRO-2 (DeepSpeed's optimizer steps flat fp32
partitions through it), also across a freezing milestone, which rebuilds the optimizer."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import full_student_params, make_cfg, random_batch


def _train(single_rank, stage: int, impl: str, steps: int = 5):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg(f"parallel.zero_stage={stage}", f"train.optimizer_impl={impl}", "train.max_steps=10",
                   "distill.freeze_fractions=[0.25, 0.5, 0.75]")  # 1, 2 and 3 layers frozen at steps 1, 2, 3
    tm = SDTrainModule(cfg, single_rank)
    losses = [train_step(tm, [random_batch(cfg, i)], i).loss for i in range(steps)]
    adamw = getattr(tm.engine.optimizer, "optimizer", tm.engine.optimizer)  # ZeRO wraps torch's AdamW
    return tm, losses, adamw


@pytest.mark.parametrize("stage", [0, 2])
def test_every_kernel_trains_the_same_model(single_rank, stage):
    runs = {impl: _train(single_rank, stage, impl) for impl in ("fused", "for-loop", "foreach")}
    tm, losses, adamw = runs["fused"]
    assert tm.frozen == 3, "three freezing milestones (optimizer rebuilds) should have passed"
    assert adamw.defaults["fused"] is True  # the default kernel, kept by the rebuild
    assert runs["for-loop"][2].defaults["foreach"] is False and runs["foreach"][2].defaults["foreach"] is True
    weights = full_student_params(tm)
    for impl in ("for-loop", "foreach"):
        other, other_losses, _ = runs[impl]
        torch.testing.assert_close(torch.tensor(other_losses), torch.tensor(losses), rtol=1e-5, atol=0.0)
        for a, b in zip(full_student_params(other), weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(other.teacher.full_parameters(), tm.teacher.full_parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert losses[-1] != losses[0]


def test_the_default_kernel_is_fused_and_an_unknown_one_is_refused():
    from sdt_dist.config import OPTIMIZER_IMPLS, ConfigError
    from sdt_dist.parallel.engine import _ADAMW_KERNEL

    assert make_cfg().train.optimizer_impl == "fused"
    assert set(OPTIMIZER_IMPLS) == set(_ADAMW_KERNEL)
    with pytest.raises(ConfigError, match="train.optimizer_impl"):
        make_cfg("train.optimizer_impl=apex")
