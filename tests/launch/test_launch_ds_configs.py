"""Every DeepSpeed JSON in ds_configs/ parses with DeepSpeed's own config parser and trains steps on 2 ranks.

The stage comes from `parallel.zero_stage` alone (the files say "auto"); `zeroN*.json` holds the details
meant for stage N and is used with it, precision-only files (bf16.json, fp16.json) with every stage.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sdt_dist.parallel.engine import build_ds_config
from tests.helpers import REPO, free_port, make_cfg, worker_env

CONFIG_DIR = REPO / "ds_configs"
FILES = sorted(CONFIG_DIR.glob("*.json"))
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _raw(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _stages(path: Path) -> list[int]:
    named = re.match(r"zero(\d)", path.name)
    return [int(named.group(1))] if named else [0, 1, 2, 3]


def _wants_offload(raw: dict[str, Any]) -> bool:
    return raw.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"


SPECS = [(f, s) for f in FILES for s in _stages(f)]
SPEC_IDS = [f"{f.name}:zero{s}" for f, s in SPECS]


def test_the_documented_variants_exist() -> None:
    names = {f.name for f in FILES}
    assert {"zero1.json", "zero2.json", "zero3.json", "bf16.json", "fp16.json"} <= names, names
    assert any(_wants_offload(_raw(f)) for f in FILES), "no optimizer-offload variant"


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_batch_sizes_are_derived_and_the_optimizer_is_ours(path: Path) -> None:
    raw = _raw(path)
    for key in BATCH_KEYS:  # derived from train.* by build_ds_config, never written twice
        assert raw.get(key, "auto") == "auto", f"{path.name}: {key} must be \"auto\" (or absent)"
    assert "optimizer" not in raw and "scheduler" not in raw, f"{path.name}: sdt-dist owns optimizer/scheduler"
    assert "gradient_clipping" not in raw, f"{path.name}: clipping comes from train.grad_clip"
    assert raw.get("zero_optimization", {}).get("stage", "auto") == "auto", \
        f"{path.name}: the ZeRO stage comes from parallel.zero_stage"


@pytest.mark.parametrize(("path", "stage"), SPECS, ids=SPEC_IDS)
def test_parses_with_deepspeed(path: Path, stage: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = _raw(path)
    cfg = make_cfg(f"parallel.ds_config={path}", f"parallel.zero_stage={stage}", "train.global_batch_size=8",
                   "train.micro_batch_size=4")
    # One data-parallel rank here (no process group in this process): 8 = 4 x 2 accumulation steps.
    parsed = DeepSpeedConfig(build_ds_config(cfg, dp=1))
    assert (parsed.train_batch_size, parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) \
        == (8, 4, 2)
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == raw.get("bf16", {}).get("enabled", False)
    assert parsed.float16_config.enabled == raw.get("fp16", {}).get("enabled", False)
    offload = parsed.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == _wants_offload(raw)
    assert parsed.gradient_clipping == cfg.train.grad_clip
    assert parsed.optimizer_name is None and parsed.scheduler_name is None


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One 2-rank torchrun job that builds the engine of every (file, stage) and trains 3 steps on it."""
    out = tmp_path_factory.mktemp("ds-configs") / "results.json"
    specs = [f"{f.relative_to(REPO)}:{s}" for f, s in SPECS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "workers" / "ds_step_worker.py"), str(out), *specs]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and out.is_file(), \
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    return {f"{Path(k.rsplit(':', 1)[0]).name}:zero{k.rsplit(':', 1)[1]}": v for k, v in results.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("path", "stage"), SPECS, ids=SPEC_IDS)
def test_trains_steps_on_two_ranks(trained: dict[str, dict[str, Any]], path: Path, stage: int) -> None:
    res = trained[f"{path.name}:zero{stage}"]
    if "skip" in res:
        pytest.skip(res["skip"])
    assert "error" not in res, res.get("error")
    raw = _raw(path)
    losses = res["losses"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), res
    assert losses[2] < losses[0], f"3 steps on one batch did not lower its loss: {losses}"
    # only fp16's loss scaler skips steps (overflowing scaled gradients while the scale comes down)
    assert res["skipped"] == 0 or raw.get("fp16", {}).get("enabled", False), res
    assert res["stage"] == stage
    assert res["bf16"] == raw.get("bf16", {}).get("enabled", False)
    assert res["fp16"] == raw.get("fp16", {}).get("enabled", False)
    # DeepSpeed offloads only with a ZeRO optimizer (stage >= 1)
    assert res["offload"] == (_wants_offload(raw) and stage >= 1)
