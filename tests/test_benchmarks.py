"""The benchmark scripts run end to end and print what docs/performance.md quotes from them: a smoke run at a
tiny shape, two rounds (no time is asserted; fused_loss.py checks its arms' values against each other itself)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, worker_env

pytestmark = pytest.mark.slow  # separate processes

SMOKE = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--threads", "1"]


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_step_cost_prints_every_arm_ratio_and_memory():
    out = _run("benchmarks/step_cost.py", *SMOKE)
    for row in ("| peer plain |", "| peer naive SD |", "| peer plain, fused AdamW", "| ours plain |",
                "| ours SD, no freezing, no LayerDrop |", "| ours SD without alignment",
                "| ours SD, steps 30-99: 1 frozen", "schedule-averaged SD step (FLOPs)", "EMA update:",
                "peak memory (RSS"):
        assert row in out, row


def test_step_cost_levers_and_shared_trunk_modes_run():
    out = _run("benchmarks/step_cost.py", *SMOKE, "--levers")
    for lever in ("DeepSpeed all-reduce at DP=1", "for-loop AdamW", "torch cross-entropy", "separate LM and KD losses"):
        assert f"{lever} / with the lever" in out, lever
    out = _run("benchmarks/step_cost.py", *SMOKE, "--trunk", "--set", "distill.freeze_embedding=true")
    assert "trunk shared true" in out and "shared / recomputed" in out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fused_loss_benchmark_runs(dtype):
    out = _run("benchmarks/fused_loss.py", "--vocab", "64", "--tokens", "32", "--rounds", "3", "--chunks", "8,10",
               "--threads", "1", "--dtype", dtype)
    assert "| fused, chunk 2^8 |" in out and "| separate losses |" in out and f"cpu {dtype}" in out
