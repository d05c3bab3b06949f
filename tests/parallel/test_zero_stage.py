"""The ZeRO stage has one source of truth, `parallel.zero_stage`: the shipped JSONs hold none."""

from __future__ import annotations

import json
import math

import pytest

from sdt_dist.config import ConfigError, load_config
from sdt_dist.parallel.engine import build_ds_config
from tests.helpers import REPO, TINY, random_batch

TINY_YAML = REPO / "launchers" / "configs" / "tiny.yaml"


def test_tiny_yaml_with_zero_stage_3_builds_a_stage_3_deepspeed_config():
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(TINY_YAML, ["parallel.zero_stage=3"])
    parsed = DeepSpeedConfig(build_ds_config(cfg, dp=1))  # one rank: this process
    assert parsed.zero_optimization_stage == 3
    assert parsed.train_batch_size == cfg.train.global_batch_size


def test_a_json_that_names_another_stage_is_refused(tmp_path):
    path = tmp_path / "zero1_fixed.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = load_config(TINY_YAML, [f"parallel.ds_config={path}", "parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=3 disagrees with .*zero1_fixed.json \(stage 1\)"):
        build_ds_config(cfg, dp=1)
    agreeing = load_config(TINY_YAML, [f"parallel.ds_config={path}", "parallel.zero_stage=1"])
    assert build_ds_config(agreeing, dp=1)["zero_optimization"]["stage"] == 1


def test_tiny_yaml_trains_two_steps_under_zero_3(single_rank):
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    cfg = load_config(TINY_YAML, [o for o in TINY if not o.startswith("parallel.ds_config")]
                      + ["parallel.zero_stage=3"])
    assert cfg.parallel.ds_config == "ds_configs/zero1.json"
    tm = SDTrainModule(cfg, single_rank)
    assert tm.engine.zero_optimization_stage() == 3
    losses = [train_step(tm, [random_batch(cfg, s)], s) for s in range(2)]
    assert all(not r.skipped and math.isfinite(r.loss) for r in losses)



def test_zero3_parameters_get_weight_decay_by_their_full_shape(single_rank):
    """A ZeRO-3 parameter's own tensor is a 1-D partition: grouped by it, no matrix would get weight decay, and
    the groups would change with what happens to be gathered (a resume after freezing then fails to load)."""
    import dataclasses

    from sdt_dist.parallel.engine import param_groups
    from sdt_dist.train_module import SDTrainModule
    from tests.helpers import make_cfg

    tm = SDTrainModule(make_cfg("parallel.zero_stage=3"), dataclasses.replace(single_rank, zero_stage=3))
    named = list(tm.student.named_parameters())
    assert all(p.ndim == 1 for _, p in named)  # partitioned
    decay, no_decay = param_groups(named, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for _, p in named if len(p.ds_shape) >= 2}
    assert len(decay["params"]) > 4 * 4  # qkv, proj, fc1, fc2 of 4 layers, embedding, head, predictors
    assert len(tm.engine.optimizer.optimizer.param_groups) == 2
    tm.engine.destroy()
