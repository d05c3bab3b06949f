import pytest
import torch

from tests.helpers import ema_closed_form, make_cfg, read_json, run_probe, run_ranks

NO_FREEZE = ["distill.freeze_milestones=[0.97,0.98,0.99]", "distill.freeze_fractions=[0.1,0.2,0.3]"]


@pytest.mark.parametrize("stage", [0, 3])
def test_teacher_equals_closed_form_of_student_history(single_rank, stage):
    cfg = make_cfg(f"parallel.zero_stage={stage}", "distill.ema_tau=0.8", *NO_FREEZE)
    out = run_probe(cfg, single_rank, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(out["teacher0"], out["history"][0]))  # init = student
    expected = ema_closed_form(out["history"], [0.8] * 5)
    for got, exp in zip(out["teacher"], expected):
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-6)
    # the teacher really moved and really lags the student
    assert any(not torch.equal(a, b) for a, b in zip(out["teacher"], out["teacher0"]))
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(out["teacher"], out["history"][-1]))
    tm = out["tm"]
    assert all(not p.requires_grad and p.grad is None for p in tm.teacher.module.parameters())
    assert tm.teacher.local_numel() == tm.teacher.full_numel()  # one rank holds all of it


def test_annealed_tau_follows_schedule(single_rank):
    cfg = make_cfg("distill.ema_tau=0.5", "distill.ema_tau_end=0.9", "distill.ema_anneal_frac=0.2", *NO_FREEZE)
    out = run_probe(cfg, single_rank, steps=5)
    taus = [r.tau for r in out["records"]]
    assert taus == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    for got, exp in zip(out["teacher"], ema_closed_form(out["history"], taus)):
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-6)


def test_frozen_layers_are_copied_not_averaged(single_rank):
    # milestone at step 2 of 20 freezes floor(0.5*4)=2 layers and the embedding
    cfg = make_cfg("distill.ema_tau=0.9", "distill.freeze_milestones=[0.1]", "distill.freeze_fractions=[0.5]")
    out = run_probe(cfg, single_rank, steps=4)
    tm = out["tm"]
    frozen = tm.frozen_indices()
    assert tm.frozen == 2 and frozen
    for i in frozen:
        assert torch.equal(out["teacher"][i], out["history"][-1][i])
    # unfrozen ones are still averages (differ from the student)
    unfrozen = [i for i in range(len(out["teacher"])) if i not in frozen]
    assert any(not torch.equal(out["teacher"][i], out["history"][-1][i]) for i in unfrozen)


def test_bf16_training_keeps_fp32_teacher_shards_and_runs_the_teacher_in_bf16(single_rank):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step
    from tests.helpers import random_batch

    cfg = make_cfg("parallel.ds_config=ds_configs/bf16.json", "parallel.zero_stage=1", *NO_FREEZE)
    tm = SDTrainModule(cfg, single_rank)
    assert tm.dtype == torch.bfloat16 and tm.teacher.shard.dtype == torch.float32
    res = train_step(tm, [random_batch(cfg, 0)], 0)
    assert not res.skipped and all(map(torch.isfinite, torch.tensor([res.loss, res.loss_kd, res.loss_align])))
    out = tm.teacher(random_batch(cfg, 1)["tokens"])
    assert out.logits.dtype == torch.bfloat16
    assert all(p.numel() == 0 for p in tm.teacher.module.parameters())  # released after the forward


def test_teacher_forward_gathers_one_module_at_a_time(single_rank):
    from sdt_dist.train_module import SDTrainModule
    from tests.helpers import random_batch

    cfg = make_cfg("model.tie_embeddings=true")
    teacher = SDTrainModule(cfg, single_rank).teacher
    tokens = random_batch(cfg, 0)["tokens"]
    out = teacher(tokens)
    # at most one unit (the embedding, which the tied head also uses, or one layer) was whole at a time
    assert teacher.peak_numel == teacher.largest_unit_numel() < teacher.full_numel() / 2
    assert all(p.numel() == 0 for p in teacher.module.parameters())
    # the same numbers as with every weight gathered up front
    with teacher.materialized(), torch.no_grad():
        whole = teacher.module(tokens)
    assert torch.equal(out.logits, whole.logits)
    assert out.hidden.keys() == whole.hidden.keys()
    assert all(torch.equal(out.hidden[k], whole.hidden[k]) for k in out.hidden)



@pytest.fixture(scope="module")
def gather_runs(tmp_path_factory):
    """tests/workers/teacher_gather.py at DP = 2 in bf16, once per `distill.teacher_gather` mode."""
    root = tmp_path_factory.mktemp("gather")
    runs = {}
    for mode in ("module", "step"):
        run_ranks(2, "teacher_gather.py", str(root / f"{mode}.json"), mode)
        runs[mode] = read_json(root / f"{mode}.json")
        runs[mode]["teacher"] = torch.load(root / f"{mode}.json.teacher.pt")
    return runs


@pytest.mark.slow
def test_teacher_gathers_in_the_compute_dtype_over_two_ranks(gather_runs):
    """bf16 at DP = 2 (ZeRO-1, real ranks): the teacher's slices travel in bf16; the allocator's peak while its
    largest module is gathered is sdt-plan's estimate, 4 bytes a value (the gathered buffer and the copies that
    join each parameter's slices), where gathering the fp32 shard and casting after took 8; and the forward, which
    gathers the next module while one runs, equals bitwise that of the whole fp32 teacher cast to bf16 on one
    rank."""
    r = gather_runs["module"]
    assert r["dp"] == 2 and r["dtype"] == r["gathered_dtype"] == "torch.bfloat16"
    assert r["planned"] == 4 * r["unit_numel"] and abs(r["peak"] - r["planned"]) <= 64, r
    assert r["bitwise"] and gather_runs["step"]["bitwise"]
    assert r["in_flight_at_unit_2"] == [3]  # the next module's gather overlaps this one's forward


@pytest.mark.slow
def test_teacher_gathered_once_per_step_trains_the_same(gather_runs):
    """distill.teacher_gather=step: the teacher gathered once (module by module) for the step's two micro-batches
    instead of for each, and bitwise the same losses and teacher."""
    module, step = gather_runs["module"], gather_runs["step"]
    assert module["losses"] == step["losses"]
    assert all(torch.equal(a, b) for a, b in zip(module["teacher"], step["teacher"]))
    per_forward = module["forward_gathers"]  # every module, and the tied head's embedding again
    assert per_forward > module["units"] >= 6
    assert module["step_gathers"] - step["step_gathers"] == 2 * per_forward - module["units"]
