"""Compute accounting: parameter counts, FLOPs formulas, the freezing ratio, and times from metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from sdt_dist.eval.compute import (
    flops_per_token,
    logged_time,
    parameter_counts,
    run_compute,
    schedule_flops,
)
from sdt_dist.metrics import read_metrics
from tests.helpers import make_cfg, tiny_model

NO_DISTILL = ["distill.lambda_kd=0", "distill.lambda_sd=0", "distill.layerdrop_p=0",
              "distill.freeze_milestones=[]", "distill.freeze_fractions=[]"]


def test_parameter_counts(single_rank):
    cfg = make_cfg("model.tie_embeddings=false")
    d, v = cfg.model.hidden_size, cfg.model.vocab_size
    counts = parameter_counts(tiny_model(cfg))
    assert counts["per_layer"] == 12 * d * d + 13 * d  # qkv, proj, fc1, fc2 with biases; two LayerNorms
    assert counts["embedding"] == counts["output_head"] == v * d
    assert counts["total"] == 4 * counts["per_layer"] + 2 * v * d + 2 * d  # + final LayerNorm
    assert parameter_counts(tiny_model(make_cfg()))["output_head"] == 0  # tied


def test_flops_per_token_formula():
    m = make_cfg().model  # L=4, d=32, V=128, s=16
    per_layer = 12 * 32 * 32 + 13 * 32
    n = 4 * per_layer + 32 * 128
    f = flops_per_token(m, per_layer)
    assert f["forward"] == 2 * n + 2 * 4 * 16 * 32
    assert f["training"] == 6 * n + 6 * 4 * 16 * 32


def test_plain_run_costs_plain_training_flops():
    cfg = make_cfg(*NO_DISTILL)
    out = schedule_flops(cfg, 1000, world_size=1)
    assert out["train_flops"] == out["train_flops_without_freezing"] == pytest.approx(out["train_flops_plain_gpt"])
    assert out["freezing_compute_ratio"] == 1.0 and out["frozen_timeline"] == [(1, 0)]


@pytest.mark.parametrize("freeze_embedding", [True, False])
def test_freezing_ratio_by_hand(freeze_embedding):
    # L=4, 20 steps; half the layers frozen from 50% of training; no teacher, no LayerDrop.
    cfg = make_cfg(*NO_DISTILL[:3], "distill.freeze_milestones=[0.5]", "distill.freeze_fractions=[0.5]",
                   f"distill.freeze_embedding={str(freeze_embedding).lower()}")
    m = cfg.model
    per_layer = 1000
    layer = 2 * per_layer + 2 * m.seq_length * m.hidden_size
    head = 2 * m.hidden_size * m.vocab_size
    full = 3 * (4 * layer + head)
    # frozen layers need no backward when the embedding below them is frozen too; a trainable embedding
    # needs their input gradients (1x their forward)
    frozen2 = (4 * layer + head) + 2 * (2 * layer + head) + (0 if freeze_embedding else 2 * layer)
    out = schedule_flops(cfg, per_layer, world_size=1)
    assert out["frozen_timeline"] == [(1, 0), (11, 2)]
    assert out["freezing_compute_ratio"] == pytest.approx((10 * full + 10 * frozen2) / (20 * full))


def test_teacher_and_layerdrop_are_counted():
    plain = schedule_flops(make_cfg(*NO_DISTILL), 1000, 1)["train_flops"]
    kd = schedule_flops(make_cfg(*NO_DISTILL[1:]), 1000, 1)["train_flops"]  # lambda_kd = 1: teacher forward
    dropped = schedule_flops(make_cfg(*NO_DISTILL[:2], "distill.layerdrop_p=0.5",
                                      *NO_DISTILL[3:]), 1000, 1)["train_flops"]
    assert plain / 3 * 4 == pytest.approx(kd)  # + one forward
    assert dropped < plain


def _write_metrics(run_dir, records):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_metrics_dedup_and_time(tmp_path):
    recs = [{"step": 5, "step_time_s": 1.0, "frozen_layers": 0}, {"step": 10, "step_time_s": 2.0, "frozen_layers": 0},
            # resumed from step 5: step 10 logged again, then 15
            {"step": 10, "step_time_s": 3.0, "frozen_layers": 0}, {"step": 15, "step_time_s": 4.0, "frozen_layers": 0}]
    _write_metrics(tmp_path, recs)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 20, "step_ti')  # a line cut by a crash mid-write
    got = read_metrics(tmp_path)
    assert [r["step"] for r in got] == [5, 10, 15] and got[1]["step_time_s"] == 3.0
    assert read_metrics(tmp_path / "none") == []
    assert logged_time(got) == 5 * 1.0 + 5 * 3.0 + 5 * 4.0


def test_run_compute_accelerator_hours(tmp_path):
    cfg = make_cfg(*NO_DISTILL[:3], "distill.freeze_milestones=[0.5]", "distill.freeze_fractions=[0.5]",
                   "train.global_batch_size=8")
    recs = [{"step": s, "step_time_s": 0.5 if s <= 10 else 0.25, "frozen_layers": 0 if s <= 10 else 2}
            for s in range(2, 21, 2)]
    _write_metrics(tmp_path, recs)
    meta = {"world_size": 2, "step": 20, "consumed_samples": 80, "layout": "world=2"}
    out = run_compute(cfg, meta, tmp_path, {"per_layer": 1000, "total": 1})
    assert out["tokens_seen"] == 80 * cfg.model.seq_length
    assert out["accelerator_hours"] == pytest.approx((10 * 0.5 + 10 * 0.25) * 2 / 3600)
    assert out["mean_step_time_s_by_frozen_layers"] == {"0": 0.5, "2": 0.25}
    assert out["logged_frozen_matches_schedule"]
