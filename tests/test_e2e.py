"""End to end: real 2-rank DeepSpeed runs (the `deepspeed` launcher, CPU, gloo) on OpenWebText-1000."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import OWT, REPO, free_port, worker_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OWT.is_file(), reason=f"{OWT} not present")]

KEYS = {"step", "loss", "loss_lm", "loss_kd", "loss_align", "lr", "tau", "frozen_layers", "dropped_layers",
        "tokens_per_s", "mfu"}


@pytest.fixture(scope="session")
def owt_prepared(tmp_path_factory) -> Path:
    from sdt_dist.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("owt") / "owt1000-sp4096"
    prepare_corpus(str(OWT), out, vocab_size=4096, workers=2, progress=False)
    return out


def launch(out_dir: Path, prepared: Path, *overrides: str, fault: str | None = None) -> subprocess.Popen:
    port = free_port()
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(port),
           "launchers/pretrain_owt.py", "--config", "launchers/configs/tiny.yaml",
           "--set", f"train.out_dir={out_dir}", "--set", "data.source=null", "--set", f"data.prepared=[{prepared}]",
           "--set", "logging.log_interval=1"]
    for o in overrides:
        cmd += ["--set", o]
    log = open(out_dir.parent / f"{out_dir.name}.log", "a")
    env = worker_env()
    if fault:
        env["SDT_FAULT"] = fault
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.master_port = port
    return proc


def shm_left(proc: subprocess.Popen) -> list[Path]:
    """DeepSpeed's CPU all-reduce workspaces of this job still in /dev/shm (`dims._unlink_shm_workspace`): none
    once the job has ended, however it ended."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{proc.master_port}_*"))


def finish(proc: subprocess.Popen, out_dir: Path, timeout: int = 600) -> None:
    rc = proc.wait(timeout=timeout)
    log = (out_dir.parent / f"{out_dir.name}.log").read_text()
    assert rc == 0, log[-5000:]
    assert not shm_left(proc)


def metrics(out_dir: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run rewrites the steps after its checkpoint)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, owt_prepared) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "run_a"
    finish(launch(out, owt_prepared), out)
    return out


def test_training_lowers_loss_and_writes_outputs(uninterrupted):
    m = metrics(uninterrupted)
    assert sorted(m) == list(range(1, 61))
    for record in m.values():
        assert KEYS <= set(record)
        assert 0 < record["mfu"] < 10  # a measured CPU peak on a shared machine can be low: loose bound
    first = sum(m[s]["loss_lm"] for s in range(1, 6)) / 5
    last = sum(m[s]["loss_lm"] for s in range(56, 61)) / 5
    assert last < first - 0.5, (first, last)
    assert m[60]["val_ppl"] < m[30]["val_ppl"]
    # freezing milestones of tiny.yaml: 10/20/30% of 60 steps -> 1, 1, 2 layers
    assert [m[s]["frozen_layers"] for s in (6, 7, 13, 19)] == [0, 1, 1, 2]
    assert any(m[s]["dropped_layers"] for s in m)  # LayerDrop p=0.1 over 4 layers x 60 steps
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = uninterrupted / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000060"
    assert (ckpt / "step_00000060" / "export" / "student.safetensors").is_file()
    assert len(list((ckpt / "step_00000060").glob("rank_*.pt"))) == 2


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, owt_prepared, tmp_path):
    """Kill -9 after the step-30 checkpoint, resume with `--resume auto`: the same run, bit for bit."""
    out = tmp_path / "run_b"
    proc = launch(out, owt_prepared)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 600
    while not (latest.is_file() and latest.read_text() == "step_00000030"):
        assert proc.poll() is None, "run ended before its step-30 checkpoint"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not shm_left(proc)  # kill -9 leaves no shared memory behind either
    killed_at = max(metrics(out))
    assert killed_at < 60
    finish(launch(out, owt_prepared), out)
    a, b = metrics(uninterrupted), metrics(out)
    for step in range(31, 61):
        for key in ("loss", "loss_lm", "loss_kd", "loss_align", "lr", "tau", "frozen_layers", "dropped_layers"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    assert a[60]["val_ppl"] == b[60]["val_ppl"]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(uninterrupted, owt_prepared, tmp_path):
    out = tmp_path / "run_c"
    proc = launch(out, owt_prepared, fault="save@60:rank1")  # rank 1 dies inside the step-60 save
    assert proc.wait(timeout=600) != 0
    ckpt = out / "checkpoints"
    assert (ckpt / ".tmp-step_00000060").is_dir() and not (ckpt / "step_00000060").exists()
    assert (ckpt / "latest").read_text() == "step_00000030"
    finish(launch(out, owt_prepared), out)  # --resume auto (the default) takes step 30
    log = (out.parent / "run_c.log").read_text()
    assert "resumed from" in log and "step_00000030 at step 30" in log
    assert (ckpt / "latest").read_text() == "step_00000060" and not (ckpt / ".tmp-step_00000060").exists()
    a, c = metrics(uninterrupted), metrics(out)
    assert all(a[s]["loss"] == c[s]["loss"] for s in range(31, 61))


def test_a_dying_rank_ends_the_job_promptly_and_is_named(owt_prepared, tmp_path):
    out = tmp_path / "run_d"
    t0 = time.time()
    proc = launch(out, owt_prepared, fault="step@5:rank1")
    rc = proc.wait(timeout=300)
    elapsed = time.time() - t0
    log = (out.parent / "run_d.log").read_text()
    assert rc != 0 and elapsed < 240, (rc, elapsed)
    assert "--local_rank=1" in log and "exits with return code = -9" in log
