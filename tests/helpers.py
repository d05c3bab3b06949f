"""Shared test helpers: small configs, synthetic batches, real multi-process launches, and the launch-layer
tests' small runs (arguments, stub Slurm commands on PATH, signalled jobs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from sdt_dist.config import Config, load_config
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config
from sdt_dist.paths import owt1000

if TYPE_CHECKING:  # heavy imports only where the probe runs
    from sdt_dist.parallel.dims import ParallelDims
    from sdt_dist.train_module import SDTrainModule

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
OWT = owt1000()

TINY = [
    "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.vocab_size=128",
    "model.seq_length=16", "train.micro_batch_size=4", "train.global_batch_size=4", "train.max_steps=20",
    "train.warmup_steps=2", "data.prepared=[unused]", "parallel.ds_config=null",
    # every component on (the paper's schedule), whatever the defaults
    "distill.freeze_milestones=[0.1, 0.2, 0.3]", "distill.freeze_fractions=[0.1, 0.2, 0.3]", "distill.layerdrop_p=0.1",
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


def tiny_model(cfg: Config, seed: int = 0) -> GPTModel:
    """An eval-mode model with random weights, a larger init than 0.02 so that layers matter (needs the
    `single_rank` fixture)."""
    m = cfg.model
    torch.manual_seed(seed)
    specs = student_layer_specs([0.0] * m.num_layers, rope_base=m.rope_base)
    gpt = GPTModel(transformer_config(m, cfg.parallel), specs, m.vocab_size, m.tie_embeddings)
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return gpt.eval()


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


def finish_worker() -> None:
    """End a tests/workers/ process: tear down its process groups, then exit without running C++ static
    destructors (DeepSpeed's CPU comm op sometimes aborts there after all work is done; cpu-facts)."""
    from sdt_dist.parallel.dims import destroy_parallel

    destroy_parallel()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


STUBS = REPO / "tests" / "launch" / "stubs"  # stand-ins for Slurm commands
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


def gathered_named_student_parameters(tm: SDTrainModule) -> list[tuple[str, torch.Tensor]]:
    """This rank's student and predictor weights (its TP shard, its stage's), ZeRO-3 partitions gathered."""
    import deepspeed

    out = []
    for n, p in tm.named_student_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out.append((n, p.detach().clone()))
    return out


def full_student_params(tm: SDTrainModule) -> list[torch.Tensor]:
    import deepspeed

    out = []
    for p in tm.student_gpt_params():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out.append(p.detach().float().clone())
    return out


def allocation_peak(build: Callable[[], T]) -> tuple[T, int]:
    """(build(), the most bytes the CPU allocator had handed out at once during it, beyond what was live
    before): torch's profiler records every CPU allocation and free with its size, in order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = build()
    events, sizes = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while events:
        e = events.pop()
        events.extend(e.children)
        if e.tag == _EventType.Allocation:
            sizes.append((e.start_time_ns, e.extra_fields.alloc_size))  # negative for a free
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return out, peak


def run_probe(cfg: Config, dims: ParallelDims, steps: int, batch_seed: int = 100,
              measure_init: bool = False) -> dict:
    """Drive an SDTrainModule on synthetic batches (in-process or per rank) and record what the tests check:
    `steps` steps; global batch b comes from seed batch_seed+step and is split over DP ranks. `measure_init`:
    also the allocation peak of building the SDTrainModule (`init_peak`, else None)."""
    from sdt_dist.parallel.optimizer_state import optimizer_state_numel
    from sdt_dist.plan.measure import engine_tensor_bytes
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    tm, init_peak = allocation_peak(lambda: SDTrainModule(cfg, dims)) if measure_init \
        else (SDTrainModule(cfg, dims), None)
    init_weights = dict(gathered_named_student_parameters(tm))
    history = [full_student_params(tm)]
    teacher0 = tm.teacher.full_parameters()
    records, opt_numel, frozen, copied = [], [], [], []
    mbs, dp = cfg.train.micro_batch_size, dims.dp
    gas = cfg.train.global_batch_size // (mbs * dp)
    for step in range(steps):
        glob = random_batch(cfg, batch_seed + step, batch=cfg.train.global_batch_size)
        micro = []
        for m in range(gas):
            start = (m * dp + dims.dp_rank) * mbs
            micro.append({k: v[start:start + mbs] for k, v in glob.items()})
        copied.append(tm.frozen_indices())  # the EMA update of this step copies these
        res = train_step(tm, micro, step)
        records.append(res)
        if step == 0:  # Adam state exists from the first step, nothing is frozen yet; measured before
            engine_bytes = engine_tensor_bytes(tm)  # GatheredParameters below re-partitions persistent ZeRO-3 params
        history.append(full_student_params(tm))
        opt_numel.append(optimizer_state_numel(tm.engine))
        frozen.append(tm.frozen)
    return {"engine_bytes": engine_bytes, "init_peak": init_peak, "init_weights": init_weights, "tm": tm,
            "records": records, "history": history, "teacher0": teacher0,
            "teacher": tm.teacher.full_parameters(), "opt_numel": opt_numel, "frozen": frozen, "copied": copied}


def ema_closed_form(history: list[list[torch.Tensor]], taus: list[float],
                    copied: list[frozenset[int]] | None = None) -> list[torch.Tensor]:
    """T_k = prod(tau) S_0 + sum_j (1 - tau_j) prod_{i>j} tau_i S_j, in float64; a parameter in
    copied[j-1] (frozen) takes tau = 0 at step j."""
    copied = copied or [frozenset()] * len(taus)
    out = []
    for i in range(len(history[0])):
        t = history[0][i].double()
        for j, tau in enumerate(taus, start=1):
            tau_ij = 0.0 if i in copied[j - 1] else tau
            t = tau_ij * t + (1 - tau_ij) * history[j][i].double()
        out.append(t)
    return out
