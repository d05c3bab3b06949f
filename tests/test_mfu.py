import math

import pytest
import torch

from sdt_dist.config import ConfigError
from sdt_dist.distill.schedules import aligned_layers_at
from sdt_dist.distill.shared_trunk import scheduled_shared_layers
from sdt_dist.eval.compute import layer_params, parameter_counts, schedule_flops, step_flops
from sdt_dist.mfu import mfu, peak_flops
from tests.helpers import make_cfg, tiny_model


@pytest.mark.parametrize("ffn", ["null", "40"])
def test_layer_params_from_config_match_a_built_model(single_rank, ffn):
    cfg = make_cfg(f"model.ffn_hidden_size={ffn}")
    assert layer_params(cfg.model) == parameter_counts(tiny_model(cfg))["per_layer"]


def test_step_flops_add_up_to_the_schedule_and_mfu_is_their_rate_over_the_peak():
    cfg = make_cfg("distill.layerdrop_p=0.3", "distill.freeze_milestones=[0.5]", "distill.freeze_fractions=[0.5]")
    per_layer = layer_params(cfg.model)
    steps = [step_flops(cfg, per_layer, 1, s, 0 if s < 10 else 2) for s in range(20)]
    assert sum(steps) == pytest.approx(schedule_flops(cfg, per_layer, world_size=1)["train_flops"], rel=1e-12)
    assert mfu(4e12, 2.0, 2, 1e12) == 1.0  # 4 TFLOP in 2 s on 2 devices of 1 TFLOP/s each


def test_a_shared_trunk_saves_its_teacher_layers_and_predictors_cost_12_d2_per_aligned_layer():
    # no LayerDrop: every micro-step runs every layer, so both differences are closed forms
    common = ["distill.layerdrop_p=0", "model.dropout=0", "distill.freeze_embedding=true"]
    shared, recomputed = (make_cfg(*common, f"distill.share_frozen_trunk={on}") for on in ("true", "false"))
    m, t = shared.model, shared.train
    per_layer = layer_params(m)
    tokens = t.global_batch_size * m.seq_length
    layer_fwd = 2.0 * per_layer + 2.0 * m.seq_length * m.hidden_size
    counts = [scheduled_shared_layers(shared, s) for s in range(t.max_steps)]
    assert counts == [0] * 7 + [1] * 13  # TINY: 1 of 4 layers frozen from step 6 (30%), copied in its EMA update
    saved = (schedule_flops(recomputed, per_layer, 1)["train_flops"]
             - schedule_flops(shared, per_layer, 1)["train_flops"])
    assert saved == pytest.approx(sum(counts) * layer_fwd * tokens, rel=1e-12)

    no_align = make_cfg(*common, "distill.lambda_sd=0")
    aligned = sum(len(aligned_layers_at(s, recomputed.distill, m.num_layers, t.max_steps, 0)) for s in range(20))
    assert aligned > 0
    extra = sum(step_flops(recomputed, per_layer, 1, s, 0) - step_flops(no_align, per_layer, 1, s, 0)
                for s in range(20))
    assert extra == pytest.approx(aligned * 12 * m.hidden_size**2 * tokens, rel=1e-12)


def test_peak_flops_override_else_a_measured_matmul():
    assert peak_flops(torch.float32, torch.device("cpu"), 5e11) == (5e11, "logging.peak_flops")
    value, source = peak_flops(torch.float32, torch.device("cpu"))
    assert math.isfinite(value) and value > 1e8 and source.startswith("measured")
    with pytest.raises(ConfigError, match="logging.peak_flops"):
        make_cfg("logging.peak_flops=0")
