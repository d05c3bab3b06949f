"""Resume at another parallel layout, with real processes (gloo, CPU).

Checkpoints saved at TP=2, PP=2 and ZeRO-3 x DP=2 after a freezing milestone (step 4 of 12, one layer frozen,
the second milestone two steps later) are resumed at their own layout, at TP=1 x DP=2 (ZeRO-2) and at one rank
(ZeRO-0): the next steps' losses, the teacher and the freezing state match the same-layout resume. Two launches:
2 ranks save and resume at 2 ranks, 1 rank resumes (tests/workers/resume_layout.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, make_cfg, read_json, run_ranks, worker_env

SOURCES = ("tp2", "pp2", "zero3_dp2")
TARGETS = ("dp2_zero2", "one_rank")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_layout")
    run_ranks(2, "resume_layout.py", str(out), "save", timeout=600)
    run_ranks(1, "resume_layout.py", str(out), "resume", timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_resume_at_another_layout_continues_as_at_the_same_layout(runs, source, target):
    same, got = read_json(runs / f"{source}.same.json"), read_json(runs / f"{source}.{target}.json")
    # the same-layout resume is the uninterrupted run (DeepSpeed's own files round-trip)
    assert same["losses"] == read_json(runs / f"{source}.uninterrupted.json")["losses"]
    assert got["step"] == 4 and got["consumed_samples"] == 32
    # weights and teacher as saved, whole, after loading at the new layout
    assert got["student_load_err"] == 0.0 and got["teacher_load_err"] == 0.0
    assert got["frozen_at_load"] == 1 and got["frozen"] == same["frozen"] == [1, 2, 2]
    for step, (a, b) in enumerate(zip(got["losses"], same["losses"], strict=True)):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"step {4 + step}: {a} vs {b}"  # total, lm, kd, align
    for part in ("student", "teacher"):  # after the three steps: optimizer state and EMA carried over
        a, b = (load_file(str(runs / f"{source}.{name}.{part}.safetensors")) for name in (target, "same"))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() <= 1e-5 * max(1.0, b[k].abs().max().item()), (part, k)


@pytest.mark.slow
def test_adam_state_is_in_the_checkpoint_whole(runs):
    """The layout-independent optimizer file has every trainable parameter's full-size master and moments."""
    ckpt = runs / "tp2" / "checkpoints" / "step_00000004"
    opt = load_file(str(ckpt / "full_optimizer.safetensors"))
    student = load_file(str(ckpt / "export" / "student.safetensors"))
    masters = {k.removeprefix("fp32/gpt."): v for k, v in opt.items() if k.startswith("fp32/gpt.")}
    frozen = {k for k in student if k.startswith("layers.0.")}  # layer 1 froze at step 3
    assert masters.keys() == student.keys() - frozen
    for k, v in masters.items():
        assert v.shape == student[k].shape and (v == student[k]).all()  # fp32: the master is the weight
        assert opt[f"exp_avg_sq/gpt.{k}"].shape == v.shape and (opt[f"exp_avg_sq/gpt.{k}"] > 0).any()
    assert any(k.startswith("fp32/predictors.") for k in opt) and opt["adam_step"].item() == 4


@pytest.mark.slow
def test_a_checkpoint_without_full_optimizer_state_is_refused_naming_both_layouts(runs, tmp_path):
    """Without full_optimizer.safetensors a checkpoint resumes only at its own layout: another layout exits 2
    before any process group exists (WORLD_SIZE says 2 ranks and no launcher runs: a collective would hang)."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    shutil.copytree(runs / "tp2" / "checkpoints" / "step_00000004", ckpt)
    (ckpt / "full_optimizer.safetensors").unlink()
    env = {**worker_env(), "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "launchers/pretrain_owt.py", "--config", "launchers/configs/tiny.yaml",
                           "--set", f"train.out_dir={tmp_path / 'run'}", "--set", "data.source=null"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "world=2 TP=2 PP=1 DP=1 ZeRO=1" in proc.stderr and "world=2 TP=1 PP=1 DP=2 ZeRO=1" in proc.stderr
    assert "full_optimizer.safetensors" in proc.stderr and f"train.init_from={ckpt}/export" in proc.stderr


def test_the_parallel_section_may_change_only_when_resuming_at_another_layout():
    from sdt_dist.checkpoint.resume import check_config
    from sdt_dist.config import ConfigError

    saved, now = make_cfg("parallel.tensor=2").to_dict(), make_cfg("parallel.zero_stage=3").to_dict()
    check_config(Path("ckpt"), saved, now, relayout=True)
    with pytest.raises(ConfigError, match="parallel.tensor, parallel.zero_stage: differ"):
        check_config(Path("ckpt"), saved, now)
    with pytest.raises(ConfigError, match="model.hidden_size"):
        check_config(Path("ckpt"), saved, {**now, "model": {**now["model"], "hidden_size": 64}}, relayout=True)


def test_layout_check_passes_a_checkpoint_with_full_optimizer_state(tmp_path):
    from sdt_dist.checkpoint.layout import check_resume_layout
    from sdt_dist.config import ConfigError

    ckpt = tmp_path / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    cfg = make_cfg(f"train.out_dir={tmp_path}")
    (ckpt / "meta.json").write_text(json.dumps({"config": make_cfg("parallel.tensor=2").to_dict(), "world_size": 2}))
    with pytest.raises(ConfigError, match="world=2 TP=2 PP=1 DP=1 ZeRO=1, this run is world=1 TP=1"):
        check_resume_layout(cfg, 1)
    (ckpt / "full_optimizer.safetensors").write_bytes(b"")
    check_resume_layout(cfg, 1)
    check_resume_layout(make_cfg(f"train.out_dir={tmp_path}", "parallel.tensor=2"), 2)  # same layout



class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"i": torch.tensor(i)}


def _step_samples(dp: int, mbs: int, consumed: int, steps: int) -> list[set[int]]:
    """The global samples of each step (global batch 8) when every DP rank iterates from `consumed`."""
    from sdt_dist.data.loader import MicroBatchIterator

    its = [MicroBatchIterator(_Indices(), micro_batch_size=mbs, dp_rank=r, dp_size=dp, consumed_samples=consumed)
           for r in range(dp)]
    return [{i for it in its for _ in range(8 // (mbs * dp)) for i in next(it)["i"].tolist()} for _ in range(steps)]


def test_the_data_position_is_global_so_any_dp_size_continues_at_the_same_samples():
    """From the `consumed_samples` saved after 5 steps at DP=1, DP=2 and DP=4 (mbs 2) take, step by step, the
    global batches the DP=1 run would have taken."""
    continued = _step_samples(1, 4, 0, 8)[5:]
    assert continued[0] == set(range(40, 48))
    for dp, mbs in ((1, 4), (2, 4), (4, 2)):
        assert _step_samples(dp, mbs, 5 * 8, 3) == continued
