import pytest
import torch

from sdt_dist.distill.freezing import frozen_parameters
from tests.helpers import make_cfg, random_batch, run_probe

# 12 steps; milestones at steps 3 and 6 freeze floor(0.25*4)=1 then floor(0.5*4)=2 layers (+ embedding)
FREEZE = ["train.max_steps=12", "distill.freeze_milestones=[0.25,0.5]", "distill.freeze_fractions=[0.25,0.5]",
          "model.dropout=0", "distill.layerdrop_p=0"]


# freeze_embedding=true (legacy), and false: layers only (the paper); tied embeddings cover the shared head
EMBEDDING = {"frozen": ["distill.freeze_embedding=true"],
             "trained": ["distill.freeze_embedding=false"],
             "trained_tied": ["distill.freeze_embedding=false", "model.tie_embeddings=true"]}


@pytest.fixture(scope="module")
def runs(single_rank):
    return {(stage, emb): run_probe(make_cfg(f"parallel.zero_stage={stage}", *FREEZE, *EMBEDDING[emb]), single_rank,
                              steps=9)
            for stage in (0, 1, 2, 3) for emb in ("frozen", "trained")}


@pytest.mark.parametrize("emb", ["frozen", "trained"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_params_unchanged_and_out_of_optimizer(runs, stage, emb):
    out = runs[stage, emb]
    tm = out["tm"]
    with_embedding = emb == "frozen"
    assert out["frozen"] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    frozen = tm.frozen_indices()
    frozen_params = frozen_parameters(tm.gpt, 2, with_embedding)
    assert len(frozen) == len(frozen_params) > 0
    # the first milestone is reached after step index 2: layer 1 (+ embedding) fixed from then on
    first = frozen_parameters(tm.gpt, 1, with_embedding)
    first_idx = [i for i, p in enumerate(tm.student_gpt_params()) if any(p is q for q in first)]
    for i in first_idx:
        for h in out["history"][3:]:
            assert torch.equal(h[i], out["history"][3][i])
    for i in frozen:
        for h in out["history"][6:]:
            assert torch.equal(h[i], out["history"][6][i])
    # not frozen params still move
    moving = [i for i in range(len(out["history"][0])) if i not in frozen]
    assert all(not torch.equal(out["history"][-1][i], out["history"][-2][i]) for i in moving[-4:])
    # absent from the optimizer: no param group holds them, no state; state shrank by 2 x frozen elements
    inner = getattr(tm.engine.optimizer, "optimizer", tm.engine.optimizer)
    ids = {id(p) for p in frozen_params}
    assert not any(id(p) in ids for g in inner.param_groups for p in g["params"])
    assert not any(id(p) in ids for p in inner.state)
    assert all(not p.requires_grad and p.grad is None for p in frozen_params)
    frozen_numel = sum(getattr(p, "ds_numel", p.numel()) for p in frozen_params)
    first_numel = sum(getattr(p, "ds_numel", p.numel()) for p in first)
    assert out["opt_numel"][1] - out["opt_numel"][-1] == 2 * frozen_numel
    assert out["opt_numel"][1] - out["opt_numel"][3] == 2 * first_numel


@pytest.mark.parametrize("emb", ["frozen", "trained"])
def test_all_zero_stages_agree_through_freezing(runs, emb):
    """Carrying the Adam state across the engine rebuild is exact: every ZeRO stage gives the same losses."""
    ref = [r.loss for r in runs[0, emb]["records"]]
    for stage in (1, 2, 3):
        got = [r.loss for r in runs[stage, emb]["records"]]
        assert got == pytest.approx(ref, rel=1e-4), stage


def _embedding_indices(tm) -> list[int]:
    emb = {id(p) for p in tm.gpt.embedding.parameters()}
    return [i for i, p in enumerate(tm.student_gpt_params()) if id(p) in emb]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_trainable_embedding_keeps_learning_after_every_milestone(runs, stage):
    """freeze_embedding=false: after each milestone the embedding still moves every step, through the
    frozen layers' input gradients, while those layers stay fixed; the legacy setting fixes it."""
    for emb in ("trained", "frozen"):
        out = runs[stage, emb]
        idx = _embedding_indices(out["tm"])
        moved = [any(not torch.equal(out["history"][k + 1][i], out["history"][k][i]) for i in idx)
                 for k in range(9)]
        assert moved == ([True] * 9 if emb == "trained" else [True] * 3 + [False] * 6), (emb, moved)
    # a frozen embedding leaves the autograd graph below the first unfrozen layer; a trainable one does not
    assert runs[stage, "trained"]["tm"].no_grad_prefix == 0 and runs[stage, "frozen"]["tm"].no_grad_prefix == 2


def test_a_tied_embedding_and_head_keep_learning_after_the_milestones(single_rank):
    out = run_probe(make_cfg("parallel.zero_stage=3", *FREEZE, *EMBEDDING["trained_tied"]), single_rank, steps=9)
    tm = out["tm"]
    assert tm.gpt.tie_embeddings and tm.frozen == 2
    idx = _embedding_indices(tm)
    assert all(not torch.equal(out["history"][k + 1][i], out["history"][k][i]) for k in range(3, 9) for i in idx)
    layer_ids = {id(p) for layer in tm.gpt.layers[:2] for p in layer.parameters()}
    assert sorted(tm.frozen_indices()) == [i for i, p in enumerate(tm.student_gpt_params()) if id(p) in layer_ids]


def test_autograd_stops_at_the_frozen_boundary(runs):
    tm = runs[0, "frozen"]["tm"]
    cfg = make_cfg(*FREEZE)
    out = tm.gpt(random_batch(cfg, 0)["tokens"], frozen_prefix=2)
    assert not out.hidden[1].requires_grad and not out.hidden[2].requires_grad
    assert out.hidden[3].requires_grad and out.logits.requires_grad


def test_without_alignment_the_predictors_get_no_optimizer_state_and_stay_as_built(single_rank):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg("parallel.zero_stage=0", "distill.lambda_sd=0")
    tm = SDTrainModule(cfg, single_rank)
    pred = {id(p) for p in tm.predictors.parameters()}
    in_optimizer = {id(p) for g in tm.engine.optimizer.param_groups for p in g["params"]}
    assert pred and in_optimizer and not pred & in_optimizer
    before = [p.detach().clone() for p in tm.predictors.parameters()]
    for step in range(2):
        assert not train_step(tm, [random_batch(cfg, step)], step).skipped
    # AdamW's weight decay alone would have moved them
    assert all(torch.equal(a, p) for a, p in zip(before, tm.predictors.parameters()))


def test_a_run_without_alignment_resumes_a_checkpoint_that_still_trained_its_predictors(single_rank, tmp_path):
    """Checkpoints written before the predictors of such a run left the optimizer hold their Adam state (and
    no `predictors_trained` key): the resume puts them back in, so DeepSpeed's parameter groups match; so does
    the resume at another layout, which reads the whole optimizer state instead (`checkpoint/relayout.py`)."""
    from sdt_dist import checkpoint
    from sdt_dist.checkpoint.relayout import load_at_new_layout
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = make_cfg("parallel.zero_stage=0", "distill.lambda_sd=0", "model.dropout=0", "distill.layerdrop_p=0")
    old = SDTrainModule(cfg, single_rank)
    old.train_predictors(True)  # as the code before did
    for step in range(2):
        train_step(old, [random_batch(cfg, step)], step)
    meta = {"config": cfg.to_dict(), "config_sha256": cfg.sha256(), "world_size": single_rank.world_size,
            "layout": single_rank.describe(), "step": 2, "consumed_samples": 8}
    path = checkpoint.save(old, tmp_path / "checkpoints", 2, 8, meta, keep=1)
    extra_file = path / "rank_00000.pt"
    extra = torch.load(extra_file, weights_only=True)
    assert extra.pop("predictors_trained") is True
    torch.save(extra, extra_file)  # as the code before wrote it
    new = SDTrainModule(cfg, single_rank)
    assert not new.predictors_trained
    checkpoint.load(new, path)
    assert new.predictors_trained
    moved = SDTrainModule(cfg, single_rank)
    load_at_new_layout(moved, path)
    assert moved.predictors_trained
    ref, got = train_step(old, [random_batch(cfg, 2)], 2), train_step(new, [random_batch(cfg, 2)], 2)
    assert got.loss == ref.loss
    assert train_step(moved, [random_batch(cfg, 2)], 2).loss == ref.loss
