"""The Slurm batch scripts, run as Slurm would run them, on this host: SLURM_* variables, a stub `scontrol`
that prints host names and records `requeue`, a stub `srun` that starts the tasks locally, and real
2-rank training jobs (CPU, gloo)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, launch_env, run_logged, signal_after_first_checkpoint, train_args

SLURM_DIR = REPO / "launchers" / "slurm"
SBATCH = SLURM_DIR / "pretrain_owt.sbatch"
SRUN_SBATCH = SLURM_DIR / "pretrain_owt_srun.sbatch"
SHELL_SCRIPTS = sorted([*SLURM_DIR.glob("*.sbatch"), *SLURM_DIR.glob("*.sh"), *(REPO / "docker").glob("*.sh"),
                        REPO / "tests" / "launch" / "stubs" / "scontrol"])


def slurm_env(tmp: Path, job_id: int, **extra: str) -> dict[str, str]:
    """What sbatch gives a one-node batch script (the subset the scripts read)."""
    env = launch_env(SLURM_JOB_ID=str(job_id), SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1",
                     SLURM_SUBMIT_DIR=str(REPO), SLURM_PROCID="0", SLURM_NTASKS="2",
                     SCONTROL_LOG=str(tmp / "scontrol.log"), MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


@pytest.mark.parametrize("script", [SBATCH, SRUN_SBATCH], ids=lambda p: p.name)
def test_batch_script_header(script: Path) -> None:
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    # sbatch reads directives only before the first command
    assert text.index("#SBATCH") < text.index("set -euo pipefail") and text.rindex("#SBATCH") < text.index("set -e")
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    assert "--requeue" in directives and "--open-mode=append" in directives
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck not installed (.ci/run installs it: apt-get install shellcheck)")
def test_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_refuses_to_run_outside_slurm_or_the_checkout(tmp_path: Path) -> None:
    env = launch_env()
    env.pop("SLURM_JOB_ID", None)
    args = ["bash", str(SBATCH), "--config", "launchers/configs/tiny.yaml"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "SLURM_JOB_ID is not set: submit this script with sbatch" in proc.stderr
    proc = subprocess.run(args, cwd=tmp_path, env=slurm_env(tmp_path, 4300, SLURM_SUBMIT_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not an sdt-dist checkout" in proc.stderr, proc.stderr


def test_bad_layout_fails_before_launching(tmp_path: Path) -> None:
    """4-way tensor parallelism on 1 node x 2 GPUs: the script stops with the CLI's reason, no rank starts."""
    env = slurm_env(tmp_path, 4301, GPUS_PER_NODE="2")
    args = ["bash", str(SBATCH), "--config", "launchers/configs/tiny.yaml", "--set", "parallel.tensor=4"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "world size 2 is not divisible by tensor x pipeline = 4 x 1" in proc.stderr, proc.stderr
    assert "nothing was launched" in proc.stderr and "hostfile" not in proc.stderr


def _metrics_steps(out_dir: Path) -> list[int]:
    import json

    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sbatch_trains_checkpoints_on_usr1_requeues_and_resumes(tmp_path: Path, launch_corpus: Path) -> None:
    """First start: a real 2-rank job; SIGUSR1 to the batch shell (Slurm's --signal=B:USR1) -> every rank
    checkpoints and exits 0, the script requeues the job. Second start (the requeued job, same job id):
    resumes from that checkpoint and finishes."""
    out = tmp_path / "run"
    env = slurm_env(tmp_path, 4242, GPUS_PER_NODE="2")
    cmd = ["bash", str(SBATCH), *train_args(launch_corpus, out, "train.max_steps=16")]
    log1 = tmp_path / "start1.log"
    latest = out / "checkpoints" / "latest"
    # only the batch shell, as --signal=B:USR1@120 does
    rc, text1 = signal_after_first_checkpoint(cmd, log1, env, out, signal.SIGUSR1)
    assert rc == 0, text1[-5000:]
    assert "sent SIGUSR1 to 2 rank(s)" in text1 and "received signal 10" in text1, text1[-5000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    stopped_at = int(latest.read_text().removeprefix("step_"))
    assert 4 <= stopped_at < 16, f"the signal stop should land mid-run, got step {stopped_at}"
    assert max(_metrics_steps(out)) == stopped_at

    log2 = tmp_path / "start2.log"
    rc = run_logged(cmd, log2, dict(env, SLURM_RESTART_COUNT="1"))
    text2 = log2.read_text()
    assert rc == 0, text2[-5000:]
    assert f"resumed from {out}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in text2, text2[-5000:]
    assert latest.read_text() == "step_00000016"
    assert sorted(set(_metrics_steps(out))) == list(range(1, 17))
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # a finished run is not requeued


@pytest.mark.slow
def test_srun_script_one_process_per_rank_sigterm_stops_without_requeue(tmp_path: Path, launch_corpus: Path) -> None:
    """pretrain_owt_srun.sbatch: the (stub) srun starts 2 tasks; they find their rank in SLURM_PROCID. SIGTERM
    to the batch shell (scancel --batch, or a preemption warning) reaches both tasks through srun; they
    checkpoint mid-run and exit 0, and the job is not requeued."""
    out = tmp_path / "run"
    log = tmp_path / "srun.log"
    env = slurm_env(tmp_path, 4343)
    cmd = ["bash", str(SRUN_SBATCH), *train_args(launch_corpus, out, "train.max_steps=16")]
    latest = out / "checkpoints" / "latest"
    rc, text = signal_after_first_checkpoint(cmd, log, env, out, signal.SIGTERM)  # only the batch shell
    assert rc == 0, text[-5000:]
    assert "rank discovery: slurm" in text and "parallel layout: world=2 TP=1 PP=1 DP=2 ZeRO=1" in text, text[-5000:]
    assert "received signal 15" in text, text[-5000:]
    assert "launcher exited 0 after SIGTERM (not requeued)" in text, text[-5000:]
    assert not (tmp_path / "scontrol.log").exists()  # no requeue
    stopped_at = int(latest.read_text().removeprefix("step_"))
    assert 4 <= stopped_at < 16, f"the signal stop should land mid-run, got step {stopped_at}"
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()
