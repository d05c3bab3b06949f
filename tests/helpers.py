"""Shared test helpers: small configs, synthetic batches, and real multi-process launches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from sdt_dist.config import Config, load_config
from sdt_dist.paths import owt1000

REPO = Path(__file__).resolve().parents[1]
OWT = owt1000()

TINY = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.vocab_size=128",
    "model.seq_length=16", "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=20",
    "train.warmup_steps=2", "data.prepared=[unused]", "parallel.ds_config=null",
]


def make_cfg(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def random_batch(cfg: Config, seed: int, batch: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = batch or cfg.train.micro_batch_size
    toks = torch.randint(0, cfg.model.vocab_size, (b, cfg.model.seq_length + 1), generator=g)
    mask = torch.ones(b, cfg.model.seq_length)
    mask[0, -3:] = 0.0  # some padding, so that "mean over non-padding tokens" is exercised
    return {"tokens": toks[:, :-1], "labels": toks[:, 1:], "loss_mask": mask}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Set in this pytest process by in-process single-rank tests (init_parallel); a launched job must find its own.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "TORCHELASTIC_RUN_ID")


def worker_env() -> dict[str, str]:
    """The environment of a launched job: no rank variables of this process, and this interpreter's bin
    directory (deepspeed, torchrun) first on PATH even when the venv is not activated."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    return env


def run_ranks(nproc: int, script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run tests/workers/<script> on `nproc` real processes (torchrun, gloo) and fail loudly."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "tests" / "workers" / script), *args]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


# A real training job small enough to start, train a few steps and save in ~10 s on one CPU rank.
JOB = [
    "data.source=null", "model.vocab_size=512", "model.num_layers=2", "model.hidden_size=32",
    "model.num_attention_heads=4", "model.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4",
    "train.eval_samples=4", "logging.log_interval=1", "logging.tensorboard=false",
]


def job_cmd(out_dir: Path, prepared: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """`launchers/pretrain_owt.py` with tiny.yaml shrunk to JOB: one plain process, or the deepspeed launcher."""
    launcher = [sys.executable] if nproc == 1 else \
        ["deepspeed", "--num_accelerators", str(nproc), "--master_port", str(free_port())]
    cmd = [*launcher, "launchers/pretrain_owt.py", "--config", "launchers/configs/tiny.yaml"]
    for o in [*JOB, f"data.prepared=[{prepared}]", f"train.out_dir={out_dir}", *overrides]:
        cmd += ["--set", o]
    return cmd


def run_job(out_dir: Path, prepared: Path, *overrides: str, nproc: int = 1,
            timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(job_cmd(out_dir, prepared, *overrides, nproc=nproc), cwd=REPO, env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
