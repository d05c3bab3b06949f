"""Shared frozen trunk (`sdt_dist/distill/shared_trunk.py`): the teacher's outputs from the student's frozen-prefix
states are bitwise those of a full teacher forward, and training is bitwise the same with sharing on and off."""

import pytest
import torch

from sdt_dist.config import ConfigError
from sdt_dist.distill.shared_trunk import scheduled_shared_layers, trunk_sharing
from tests.helpers import make_cfg, random_batch

# fp32, no dropout, the embedding frozen with the layers
SHARED = ["model.dropout=0", "distill.freeze_embedding=true", "distill.ema_tau=0.9"]


def _calls(modules: list[torch.nn.Module]) -> list[int]:
    """A live count of each module's forward calls (a forward pre-hook, where the teacher also gathers)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda _m, _a, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def _assert_same_outputs(shared, full) -> None:
    assert torch.equal(shared.logits, full.logits)
    assert shared.hidden.keys() == full.hidden.keys()
    assert all(torch.equal(shared.hidden[n], full.hidden[n]) for n in full.hidden)


@pytest.mark.parametrize("tie", [True, False])
def test_shared_trunk_gives_bitwise_the_teacher_outputs_of_a_full_teacher_forward(single_rank, tie):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg(*SHARED, f"model.tie_embeddings={str(tie).lower()}", "distill.freeze_milestones=[0.9]",
                   "distill.freeze_fractions=[0.5]")
    tm = SDTrainModule(cfg, single_rank)
    for step in range(3):  # teacher and student apart
        train_step(tm, [random_batch(cfg, step)], step)
    tm.freeze(2)
    tokens = random_batch(cfg, 10)["tokens"]
    student = tm.student(tokens, frozen_prefix=2, trunk=2)
    # Right after the milestone the teacher still holds its averages of the newly frozen weights: its prefix
    # states differ from the student's, and the plan shares nothing.
    assert not torch.equal(tm.teacher(tokens).hidden[1], student.trunk[1])
    assert tm.plan(3, []).shared_trunk == 0
    tm.teacher.update(tm.student_gpt_params(), 0.9, tm.frozen_indices())  # the EMA update copies them
    assert tm.plan(4, []).shared_trunk == 2
    student = tm.student(tokens, frozen_prefix=2, trunk=2)
    assert not any(h.requires_grad for h in student.trunk.values())

    embedding, layers = _calls([tm.teacher.module.embedding]), _calls(list(tm.teacher.module.layers))
    full = tm.teacher(tokens)
    assert embedding == [1 + tie] and layers == [1, 1, 1, 1]
    _assert_same_outputs(tm.teacher(tokens, trunk=student.trunk), full)
    # neither run nor gathered: the embedding (but for the tied head) and layers 1-2
    assert embedding == [1 + 2 * tie] and layers == [1, 1, 2, 2]
    assert all(p.numel() == 0 for p in tm.teacher.module.parameters())  # all released after

    # LayerDrop skipped layer 2 in the student: the teacher takes layer 1 only
    dropped = tm.student(tokens, skip=frozenset({2}), frozen_prefix=2, trunk=1)
    assert dropped.trunk.keys() == {1}
    _assert_same_outputs(tm.teacher(tokens, trunk=dropped.trunk), full)
    assert layers == [1, 2, 3, 3]
    with pytest.raises(ValueError, match="frozen"):
        tm.student(tokens, skip=frozenset({2}), frozen_prefix=2, trunk=2)


def test_the_plan_shares_the_trunk_up_to_the_first_skipped_layer():
    from sdt_dist.distill.step_plan import StepPlan

    plan = StepPlan(step=0, training=True, shared_trunk=3, drop_probs=(0.5,) * 6, seed=3)
    expected = {m: next((n - 1 for n in (1, 2, 3) if n in plan.dropped(m)), 3) for m in range(40)}
    assert {m: plan.shared(m) for m in range(40)} == expected
    assert set(expected.values()) == {0, 1, 2, 3}  # every case was drawn


def _train(cfg, single_rank, steps: int) -> dict:
    """`steps` train steps of two micro-batches; the losses, the plan's shared trunk of each step, the teacher's
    layer-1 forwards, and the final student and teacher weights."""
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step
    from tests.helpers import full_student_params

    tm = SDTrainModule(cfg, single_rank)
    layer1 = _calls([tm.teacher.module.layers[0]])
    losses, shared, capped = [], [], []
    for step in range(steps):
        plan = tm.plan(step, [])
        shared.append(plan.shared_trunk)
        capped.append([plan.shared(m) for m in range(2)])
        res = train_step(tm, [random_batch(cfg, 100 + 2 * step + m) for m in range(2)], step)
        losses.append((res.loss, res.loss_lm, res.loss_kd, res.loss_align))
    return {"losses": losses, "shared": shared, "capped": capped, "teacher_layer1": layer1[0],
            "student": full_student_params(tm), "teacher": tm.teacher.full_parameters()}


@pytest.mark.parametrize("stage, ds_config", [(0, "null"), (3, "null"), (3, "ds_configs/bf16.json")])
def test_training_is_bitwise_the_same_with_the_shared_trunk_on_and_off(single_rank, stage, ds_config):
    # milestones at steps 2 (1 layer) and 4 (2 layers) of 20; LayerDrop skips a shared layer in some micro-batches
    common = [*SHARED, f"parallel.zero_stage={stage}", f"parallel.ds_config={ds_config}", "train.global_batch_size=8",
              "distill.layerdrop_p=0.3", "distill.freeze_milestones=[0.1,0.2]", "distill.freeze_fractions=[0.25,0.5]",
              "distill.align_map=nearest"]
    on_cfg = make_cfg(*common)
    on = _train(on_cfg, single_rank, steps=8)
    off = _train(make_cfg(*common, "distill.share_frozen_trunk=false"), single_rank, steps=8)
    # each milestone's layers are shared from the step after their copy into the teacher
    assert on["shared"] == [0, 0, 0, 1, 1, 2, 2, 2] and off["shared"] == [0] * 8
    assert on["shared"] == [scheduled_shared_layers(on_cfg, s) for s in range(8)]  # what the FLOP count assumes
    assert any(c < s for cs, s in zip(on["capped"], on["shared"]) for c in cs)  # a skipped prefix layer capped it
    assert on["teacher_layer1"] < off["teacher_layer1"] == 16
    assert on["losses"] == off["losses"]
    assert all(torch.equal(a, b) for a, b in zip(on["student"], off["student"]))
    assert all(torch.equal(a, b) for a, b in zip(on["teacher"], off["teacher"]))


def test_share_frozen_trunk_config():
    assert trunk_sharing(make_cfg("model.dropout=0", "distill.freeze_embedding=true"))  # None: on without dropout
    assert not trunk_sharing(make_cfg("model.dropout=0.1", "distill.freeze_embedding=true"))
    assert not trunk_sharing(make_cfg("model.dropout=0", "distill.freeze_embedding=false"))  # nothing to share
    assert not trunk_sharing(make_cfg(*SHARED, "distill.share_frozen_trunk=false"))
    for bad, why in (("model.dropout=0.1", "model.dropout=0"), ("distill.freeze_embedding=false", "freeze_embedding"),
                     ("parallel.pipeline=2", "pipeline")):
        with pytest.raises(ConfigError, match=f"distill.share_frozen_trunk: .*{why}"):
            make_cfg(*SHARED, "distill.share_frozen_trunk=true", "model.tie_embeddings=false",
                     "parallel.zero_stage=1", bad)
