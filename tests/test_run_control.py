"""Operating a run: one job per run directory, and Ctrl-C saves like SIGTERM (real processes).

Each interrupted job is resumed to the end and compared with the same job run alone, uninterrupted: the
losses of every step and the final weights must be bitwise equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, free_port, job_cmd, run_job, worker_env

pytestmark = pytest.mark.slow  # real training processes

STEPS = 40  # long enough that a job is still training when the test has seen its first logged step
RUN = (f"train.max_steps={STEPS}", "train.global_batch_size=8")  # at 2 ranks: micro 4 x DP 2
LOSSES = ("step", "loss", "loss_lm", "loss_kd", "loss_align", "lr", "tau", "frozen_layers", "dropped_layers",
          "skipped")


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_first_step(procs: list[subprocess.Popen], out: Path, log: Path) -> None:
    deadline = time.time() + 600
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _start_ranks(out: Path, prepared: Path, log: Path, nproc: int) -> list[subprocess.Popen]:
    """`nproc` ranks as plain processes in one process group (as srun or a terminal runs them), so that the
    test sees every rank's exit status; the rank variables are those a launcher would set."""
    port, procs = free_port(), []
    for rank in range(nproc):
        env = {**worker_env(), "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(job_cmd(out, prepared, *RUN), cwd=REPO, env=env,
                                      stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                      process_group=procs[0].pid if procs else 0))
    return procs


def _wait_all(procs: list[subprocess.Popen], timeout: int = 180) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def alone(owt_small, tmp_path_factory):
    """The reference runs: the same jobs on their own, uninterrupted, at 1 and 2 ranks."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"alone{nproc}") / "run"
        proc = run_job(out, owt_small, *RUN, nproc=nproc, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[nproc] = out
    return runs


@pytest.fixture(scope="module")
def two_rank_locked_then_interrupted(owt_small, tmp_path_factory):
    """Job A (2 ranks) holds its run directory; job B (2 ranks, the deepspeed launcher) starts on it while A
    trains; then one rank of A gets Ctrl-C; then A is resumed to the end."""
    out = tmp_path_factory.mktemp("ctl2") / "run"
    log = out.parent / "a.log"
    a = _start_ranks(out, owt_small, log, nproc=2)
    try:
        _wait_for_first_step(a, out, log)
        # Hold A (SIGSTOP keeps its lock) so that it is still mid-run, whatever B's start-up takes here.
        os.killpg(a[0].pid, signal.SIGSTOP)
        stopped_at = _records(out)[-1]["step"]
        time.sleep(3)
        b = run_job(out, owt_small, *RUN, nproc=2, timeout=600)
        # Ctrl-C reaches one rank only (a launcher forwarding it per rank, another node): they must agree.
        os.kill(a[1].pid, signal.SIGINT)
        os.killpg(a[0].pid, signal.SIGCONT)
        rcs = _wait_all(a)
    finally:
        for p in a:
            if p.poll() is None:
                p.kill()
    interrupted, latest = _records(out), (out / "checkpoints" / "latest").read_text()
    resumed = run_job(out, owt_small, *RUN, nproc=2, timeout=600)
    return {"a_pid": a[0].pid, "a_rcs": rcs, "a_log": log.read_text(), "b": b, "out": out, "latest": latest,
            "stopped_at": stopped_at, "interrupted": interrupted, "resumed": resumed}


@pytest.fixture(scope="module")
def one_rank_interrupted(owt_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ctl1") / "run"
    log = out.parent / "a.log"
    a = _start_ranks(out, owt_small, log, nproc=1)
    try:
        _wait_for_first_step(a, out, log)
    except AssertionError:
        a[0].kill()
        raise
    a[0].send_signal(signal.SIGINT)
    rcs = _wait_all(a)
    interrupted, latest = _records(out), (out / "checkpoints" / "latest").read_text()
    resumed = run_job(out, owt_small, *RUN, timeout=600)
    return {"a_rcs": rcs, "a_log": log.read_text(), "out": out, "latest": latest, "interrupted": interrupted,
            "resumed": resumed}


def test_second_job_on_a_run_dir_exits_2_on_every_rank_naming_the_holder(two_rank_locked_then_interrupted):
    b = two_rank_locked_then_interrupted["b"]
    assert b.returncode == 2, b.stdout[-3000:] + b.stderr[-3000:]
    err = b.stderr
    for rank in (0, 1):
        assert f"rank {rank}: RunDirLocked" in err, err[-3000:]
    assert f"pid {two_rank_locked_then_interrupted['a_pid']} started" in err
    assert "step 1" not in b.stdout  # it trained nothing


@pytest.mark.parametrize("nproc", [1, 2])
def test_ctrl_c_finishes_the_step_saves_and_exits_0_on_every_rank(nproc, one_rank_interrupted,
                                                                   two_rank_locked_then_interrupted):
    r = one_rank_interrupted if nproc == 1 else two_rank_locked_then_interrupted
    assert r["a_rcs"] == [0] * nproc, r["a_log"][-3000:]
    last = r["interrupted"][-1]["step"]
    assert last < STEPS  # stopped early, by the signal
    assert r["latest"] == f"step_{last:08d}"  # as the stopped job left it (the resume has run since)
    assert "Traceback" not in r["a_log"] and "KeyboardInterrupt" not in r["a_log"]
    if nproc == 2:  # only rank 1 got the signal; rank 0 stopped at the same step and saved with it
        assert "received signal 2 (on some rank)" in r["a_log"]
        assert last >= r["stopped_at"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_after_ctrl_c_equals_the_run_alone_bitwise(nproc, alone, one_rank_interrupted,
                                                          two_rank_locked_then_interrupted):
    """Also the files of the first of two jobs on one run directory (2 ranks): the second changed nothing."""
    r = one_rank_interrupted if nproc == 1 else two_rank_locked_then_interrupted
    assert r["resumed"].returncode == 0, r["resumed"].stdout[-3000:] + r["resumed"].stderr[-3000:]
    ours, theirs = _records(r["out"]), _records(alone[nproc])
    assert [{k: x[k] for k in LOSSES} for x in ours] == [{k: x[k] for k in LOSSES} for x in theirs]
    assert ours[:len(r["interrupted"])] == r["interrupted"]  # the resume appended, rewrote nothing
    assert any(x["frozen_layers"] for x in ours)  # the freezing state crossed the resume too
    final = f"step_{STEPS:08d}"
    for weights in ("student", "teacher"):
        a = load_file(r["out"] / "checkpoints" / final / "export" / f"{weights}.safetensors")
        b = load_file(alone[nproc] / "checkpoints" / final / "export" / f"{weights}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    code = ("import os, signal, time\n"
            "from sdt_dist.trainer import _StopFlag\n"
            "flag = _StopFlag()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "assert flag.signum == signal.SIGINT\n"
            "print(time.time(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    # timed from the second Ctrl-C, not from the start (importing torch alone can take a minute on a busy machine)
    assert "second Ctrl-C" in proc.stderr and time.time() - float(proc.stdout) < 50
