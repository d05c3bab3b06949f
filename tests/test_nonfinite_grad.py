"""A non-finite gradient with a finite loss is skipped under ZeRO-0 (our check) and ZeRO-3 (DeepSpeed's), and
on real ranks at ZeRO-3 DP=2 and PP=2 (where a non-finite loss is skipped too): weights, Adam state and teacher
bitwise unchanged, and the run trains on."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import full_student_params, make_cfg, random_batch


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


# (fault plan `<step>:<kind>@<rank>`, layout); grad: an infinite gradient on one rank, finite loss; loss: a NaN
# loss whose gradient is finite (only the loss check can catch it). Under PP, rank 0 is the first stage and rank 1
# the last (where the loss is computed): each fault sits on another stage than where it must be caught.
MULTI_RANK = {
    "zero3_dp2": ("1:grad@1", ["parallel.zero_stage=3"]),
    "pp2": ("1:grad@0,3:loss@1", ["parallel.pipeline=2", "parallel.zero_stage=1", "model.tie_embeddings=false",
                                  "distill.layerdrop_p=0.3"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MULTI_RANK))
def test_non_finite_steps_are_skipped_on_every_rank_and_the_run_equals_one_without_them(tmp_path, layout):
    """Real ranks (gloo): the faulty steps are skipped on every rank with weights, Adam state (moments and step
    counts) and teacher bitwise unchanged; the run goes on, and its later losses and final weights, Adam state
    and teacher equal bitwise those of a run that never took the faulty steps."""
    from tests.helpers import read_json, run_ranks

    faults, overrides = MULTI_RANK[layout]
    out = tmp_path / "out.json"
    run_ranks(2, "nonfinite_skip.py", str(out), faults, "model.dropout=0", "distill.ema_tau=0.5",
              "train.global_batch_size=8", *overrides)
    rows = read_json(out)
    kinds = [f.split(":")[1].split("@")[0] for f in faults.split(",")]
    for row in rows:
        assert row["skipped"] == [True] * len(kinds)
        assert row["loss_finite"] == [kind == "grad" for kind in kinds]
        assert row["unchanged"] == [True] * len(kinds)
        assert row["others_skipped"] == [False] * len(row["losses"]) and len(row["losses"]) >= 3
        assert row["losses"] == row["losses_ref"]
        assert row["final_equal"]
