"""sdt-plan: its exact terms against the bytes a real engine allocates, its search, CLI and cost."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from sdt_dist.config import ConfigError
from sdt_dist.plan.cli import main
from sdt_dist.plan.inventory import parameter_inventory
from sdt_dist.plan.measure import engine_tensor_bytes
from sdt_dist.plan.memory import plan_layout, run_layout, run_precision
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import REPO, make_cfg, random_batch, worker_env

SEVEN_B = ["--set", "data.prepared=[unused]", "--set", "parallel.ds_config=ds_configs/bf16.json"]


@pytest.mark.parametrize("overrides", [
    ["parallel.zero_stage=0", "model.tie_embeddings=false"],
    ["parallel.zero_stage=2", "parallel.ds_config=ds_configs/bf16.json", "model.hidden_size=48"],
    ["parallel.zero_stage=3", "parallel.ds_config=ds_configs/zero3.json", "model.num_layers=3",
     "model.vocab_size=200"],
    ["parallel.zero_stage=1", "model.ffn_hidden_size=72", "model.num_attention_heads=2"],
])
def test_exact_terms_equal_engine_tensors_single_rank(single_rank, overrides):
    cfg = make_cfg("model.dropout=0", *overrides)
    dims = dataclasses.replace(single_rank, zero_stage=cfg.parallel.zero_stage)
    tm = SDTrainModule(cfg, dims)
    train_step(tm, [random_batch(cfg, 1)], 0)  # Adam moments are allocated at the first step
    layout = run_layout(cfg, 1)
    (stage,) = plan_layout(cfg, parameter_inventory(cfg), layout, run_precision(cfg, layout.dp))
    assert engine_tensor_bytes(tm) == stage.exact
    tm.engine.destroy()


def test_inventory_counts_the_real_model_and_leaves_rng_alone(single_rank):
    import torch

    cfg = make_cfg()
    before = torch.random.get_rng_state()
    inv = parameter_inventory(cfg)
    assert torch.equal(before, torch.random.get_rng_state())
    m = cfg.model
    d, f, layers = m.hidden_size, 4 * m.hidden_size, m.num_layers
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)  # 2 LNs, qkv, proj, fc1, fc2
    gpt = m.vocab_size * d + layers * per_layer + 2 * d  # tied head
    assert sum(p.numel for p in inv if p.unit != "predictor") == gpt
    assert sum(p.numel for p in inv if p.unit == "predictor") == layers * (2 * d * d + 2 * d)


def test_cli_reports_and_suggests_a_change_that_fits(capsys):
    args = ["launchers/configs/gpt_7b.yaml", *SEVEN_B, "--world", "8", "--device", "a100-80gb",
            "--set", "train.micro_batch_size=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "computed, not measured" in out and "DOES NOT FIT" in out
    flags = out.split("smallest change that fits:")[1].split("(")[0].split()
    assert flags and flags[0] == "--set"
    assert main(args + flags) == 0
    assert "fits: peak" in capsys.readouterr().out


def test_cli_weighs_gathering_the_teacher_once_a_step(capsys):
    """Over DP > 1 with several micro-batches a step the teacher is all-gathered for each: sdt-plan prints that
    volume and what distill.teacher_gather=step would cost, the peak of a plan made with that setting."""
    args = ["launchers/configs/gpt_7b.yaml", *SEVEN_B, "--world", "64", "--nodes", "8", "--device", "a100-80gb"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main([*args, "--set", "distill.teacher_gather=step"]) == 0
    step_lines = capsys.readouterr().out.splitlines()

    def gathered(out: list[str]) -> float:
        line = next(x for x in out if x.startswith("EMA teacher all-gather per rank and step:"))
        return float(line.split(":")[1].split()[0])

    (offer,) = [x for x in lines if x.startswith("with --set distill.teacher_gather=step:")]
    step_peak = next(x for x in step_lines if x.startswith("fits: peak")).split()[2]
    assert f"peak {step_peak} GiB (fits)" in offer
    assert "micro-batches" in "".join(lines) and "(once per step)" in "".join(step_lines)
    assert gathered(lines) == pytest.approx(8 * gathered(step_lines), abs=0.05)  # 8 micro-batches a step
    assert not any(x.startswith("with --set distill.teacher_gather") for x in step_lines)


def test_cli_exits_2_on_a_bad_layout(capsys):
    assert main(["launchers/configs/gpt_125m.yaml", "--world", "3", "--set", "parallel.tensor=2"]) == 2
    assert "parallel.tensor" in capsys.readouterr().err


def test_recompute_key_is_validated():
    with pytest.raises(ConfigError, match="model.recompute"):
        make_cfg("model.recompute=some")


def test_planning_7b_for_64_ranks_is_fast_and_small():
    """In a fresh process (imports excluded from the time): under a minute and 2 GB of RSS."""
    args = ["launchers/configs/gpt_7b.yaml", *SEVEN_B, "--world", "64", "--nodes", "8", "--device", "a100-80gb"]
    code = ("import resource, time, json; from sdt_dist.plan.cli import main; t = time.perf_counter(); "
            f"main({args!r}); "
            "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]))")
    proc = subprocess.run([sys.executable, "-c", code], env=worker_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=True)
    seconds, max_rss_kib = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "7." in proc.stdout and "B parameters" in proc.stdout
    assert seconds < 60 and max_rss_kib < 2 * 1024**2


def test_trainer_plan_check_logs_and_warns_on_departure(single_rank, capsys):
    from sdt_dist.plan.measure import PlanCheck

    cfg = make_cfg("model.dropout=0", "parallel.zero_stage=0")
    dims = dataclasses.replace(single_rank, zero_stage=0)
    logged: list[str] = []
    check = PlanCheck(cfg, dims, logged.append)
    tm = SDTrainModule(cfg, dims)
    train_step(tm, [random_batch(cfg, 1)], 0)
    assert "memory plan per rank" in logged[0] and "teacher_shard" in logged[0]
    check.after_step(tm)
    assert "WARNING" not in capsys.readouterr().out  # the plan is what the engine holds
    check.checked = False
    check.stage.exact["teacher_shard"] *= 2  # a plan that is off by 50% of the measurement
    check.after_step(tm)
    assert "WARNING teacher_shard" in capsys.readouterr().out
    tm.engine.destroy()


@pytest.mark.parametrize("impl", ["fused", "for-loop", "foreach"])
def test_adamw_step_temporaries_as_measured(impl):
    """sdt-plan's estimate of AdamW's step temporaries (ZeRO-0: torch's AdamW over the parameters) equals the
    bytes the CPU allocator hands out during a step, for each kernel."""
    from sdt_dist.parallel.engine import adamw
    from sdt_dist.plan.inventory import ParamInfo
    from sdt_dist.plan.memory import Layout, optimizer_step_bytes
    from tests.helpers import allocation_peak

    shapes = [(300, 200), (100, 50), (400,), (64,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = adamw([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}],
                1e-3, (0.9, 0.95), impl)
    opt.step()  # the first step allocates the moments, which the plan counts as optimizer state
    _, measured = allocation_peak(opt.step)
    infos = [ParamInfo(f"p{i}", p.numel(), False, p.dim() >= 2, "layer") for i, p in enumerate(params)]
    estimate = optimizer_step_bytes(infos, Layout(world=1, tp=1, pp=1, zero=0, micro_batch=1), impl)
    assert abs(measured - estimate) <= 64, (measured, estimate)  # a few bytes of step counters
