"""Helpers of the launch-layer tests: the small run's arguments, an environment with stub Slurm commands on
PATH, and a runner for a real multi-process job that keeps its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.helpers import REPO, worker_env

STUBS = Path(__file__).resolve().parent / "stubs"
# The small run variant of every launch test: tiny.yaml with short sequences and few steps.
SMALL = ["model.seq_length=64", "train.save_interval=4", "logging.log_interval=1"]


def train_args(corpus: Path, out_dir: Path, *overrides: str) -> list[str]:
    """Arguments of launchers/pretrain_owt.py for a small run into out_dir."""
    args = ["--config", "launchers/configs/tiny.yaml", "--set", "data.source=null",
            "--set", f"data.prepared=[{corpus}]", "--set", f"train.out_dir={out_dir}"]
    for o in [*SMALL, *overrides]:
        args += ["--set", o]
    return args


def launch_env(**extra: str) -> dict[str, str]:
    """worker_env() with the stub Slurm commands first on PATH and this interpreter's environment
    (deepspeed, mpi4py) next, whatever shell PATH pytest was started from."""
    env = worker_env()
    env["PATH"] = os.pathsep.join([str(STUBS), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["SDT_VENV"] = sys.prefix  # the batch scripts activate this virtualenv (a no-op outside one)
    env.update(extra)
    return env


def run_logged(cmd: Sequence[str], log: Path, env: dict[str, str], timeout: int = 300) -> int:
    """Run a launcher to completion in its own session (so a timeout kills every rank); return its status."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{' '.join(cmd)} ran over {timeout} s\n{log.read_text()[-5000:]}") from None


def signal_after_first_checkpoint(cmd: Sequence[str], log: Path, env: dict[str, str], out_dir: Path,
                                  sig: signal.Signals) -> tuple[int, str]:
    """Start a launcher in its own session, send `sig` to it alone (as Slurm or `docker stop` would) once the
    run's first checkpoint exists (training under way, handlers installed); return (status, log text)."""
    latest = out_dir / "checkpoints" / "latest"
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 300
        while not latest.is_file():
            assert proc.poll() is None, f"ended before its first checkpoint:\n{log.read_text()[-5000:]}"
            assert time.time() < deadline, log.read_text()[-5000:]
            time.sleep(0.1)
        proc.send_signal(sig)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, log.read_text()
