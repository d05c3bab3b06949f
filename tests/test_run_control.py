"""Operating a run: one job per run directory, and Ctrl-C saves like SIGTERM (real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, job_cmd, run_job, worker_env

pytestmark = pytest.mark.slow  # real training processes


@pytest.fixture(scope="module")
def locked_then_interrupted(owt_small, tmp_path_factory):
    """Job A holds its run directory; job B (2 ranks) starts on it 3 s later; then A gets Ctrl-C."""
    out = tmp_path_factory.mktemp("ctl") / "run"
    log = out.parent / "a.log"
    a = subprocess.Popen(job_cmd(out, owt_small, "train.max_steps=100000", "train.save_interval=100000",
                                 "train.eval_interval=100000"),
                         cwd=REPO, env=worker_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert a.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(3)
        b = run_job(out, owt_small, "train.max_steps=4", "train.global_batch_size=8", nproc=2)
        assert a.poll() is None, log.read_text()[-3000:]
        a.send_signal(signal.SIGINT)
        rc_a = a.wait(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    return {"a_pid": a.pid, "a_rc": rc_a, "a_log": log.read_text(), "b": b, "out": out}


def test_second_job_on_a_run_dir_exits_2_on_every_rank_naming_the_holder(locked_then_interrupted):
    b = locked_then_interrupted["b"]
    assert b.returncode == 2, b.stdout[-3000:] + b.stderr[-3000:]
    err = b.stderr
    for rank in (0, 1):
        assert f"rank {rank}: RunDirLocked" in err, err[-3000:]
    assert f"pid {locked_then_interrupted['a_pid']} started" in err
    assert "step 1" not in b.stdout  # it trained nothing


def test_ctrl_c_finishes_the_step_saves_and_exits_0(locked_then_interrupted):
    r = locked_then_interrupted
    assert r["a_rc"] == 0, r["a_log"][-3000:]
    records = [json.loads(line) for line in (r["out"] / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]["step"]
    assert (r["out"] / "checkpoints" / "latest").read_text() == f"step_{last:08d}"
    assert "Traceback" not in r["a_log"] and "KeyboardInterrupt" not in r["a_log"]


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    code = ("import os, signal, time\n"
            "from sdt_dist.trainer import _StopFlag\n"
            "flag = _StopFlag()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "assert flag.signum == signal.SIGINT\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(60)\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    assert "second Ctrl-C" in proc.stderr and time.time() - t0 < 50
