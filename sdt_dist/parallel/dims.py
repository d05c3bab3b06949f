"""Process groups of a run: torch.distributed + megatron-core parallel state, in one explicit object."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    zero_stage: int

    @property
    def tp_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    @property
    def pp_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return ps.get_tensor_model_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return ps.get_data_parallel_group()

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return ps.get_pipeline_model_parallel_group()

    @property
    def tp_split(self) -> dist.ProcessGroup | None:
        """The TP group when tensors are split over it (TP > 1), else None: code given None skips the collective."""
        return self.tp_group if self.tp > 1 else None

    @property
    def pp_split(self) -> dist.ProcessGroup | None:
        """The pipeline group when the model is split into stages (PP > 1), else None."""
        return self.pp_group if self.pp > 1 else None

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last stage of this rank's pipeline (where the loss is computed)."""
        return ps.get_pipeline_model_parallel_last_rank()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"world={self.world_size} TP={self.tp} PP={self.pp} DP={self.dp} ZeRO={self.zero_stage}")


_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _mpi_rank_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* of an mpirun (or `srun --mpi=...`) launch, from MPI.COMM_WORLD."""
    try:
        from mpi4py import MPI
    except ImportError:
        found = [k for k in _MPI_ENV if k in os.environ]
        raise RuntimeError(f"started by an MPI launcher ({found[0]} is set) but mpi4py is not installed: "
                           f"pip install -e '.[mpi]' (or use srun --mpi=none for SLURM_PROCID discovery)") from None
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, one_node = node.Get_rank(), node.Get_size() == comm.Get_size()
    node.Free()
    # Rank 0 decides for everyone. One node: loopback (DeepSpeed's own MPI discovery takes the first
    # `hostname -I` address, which need not be reachable); several: rank 0's host name.
    addr, port = comm.bcast((os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else socket.gethostname()),
                             os.environ.get("MASTER_PORT", "29500")), root=0)
    out = {"RANK": str(comm.Get_rank()), "WORLD_SIZE": str(comm.Get_size()), "LOCAL_RANK": str(local_rank),
           "MASTER_ADDR": addr, "MASTER_PORT": port}
    # MPI is only needed for this exchange. Finalize now: Open MPI's mpirun fails a job whose ranks exit
    # without MPI_Finalize (the CLI ends with os._exit), and forking after MPI_Init is unsafe on some fabrics.
    MPI.Finalize()
    return out


def _slurm_rank_env() -> dict[str, str]:
    """The same for one process per rank started by `srun` (SLURM_STEP_NUM_TASKS is set in srun steps only,
    not in the batch script, whose SLURM_NTASKS/SLURM_PROCID describe the allocation)."""
    env = os.environ
    addr = env.get("MASTER_ADDR")
    if not addr:
        try:  # the first host of the step
            addr = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], check=True,
                                  capture_output=True, text=True).stdout.split()[0]
        except (OSError, KeyError, IndexError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"srun launch: set MASTER_ADDR (not derivable from SLURM_STEP_NODELIST: {e})") from None
    port = env.get("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": addr, "MASTER_PORT": port}


def launcher_world_size() -> int | None:
    """The world size a launcher announced, read before any process group exists (None: no launcher)."""
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: only srun steps set it; a batch script's SLURM_NTASKS is the
    # allocation's task count even when it runs a single process (same order as init_distributed).
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def init_distributed(timeout_s: int = 600) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on CUDA, gloo/ccl on CPU: the accelerator decides).

    Works under the deepspeed launcher and torchrun (they set RANK etc.), under mpirun or `srun --mpi=...`
    (mpi4py), under plain `srun` (SLURM_PROCID), and as a single process with no launcher at all.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        # MPI first: mpirun inside a Slurm allocation starts its daemons with srun, so its ranks also
        # inherit the daemons' SLURM_PROCID.
        if any(k in os.environ for k in _MPI_ENV):
            os.environ.update(_mpi_rank_env())
        elif "SLURM_STEP_NUM_TASKS" in os.environ and "SLURM_PROCID" in os.environ:
            os.environ.update(_slurm_rank_env())
        else:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:  # any free port: a fixed one would collide with a job launched next
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    warn_stale_build_locks()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
    _unlink_shm_workspace()


def warn_stale_build_locks(max_age_s: float = 600.0) -> list[Path]:
    """torch builds DeepSpeed's JIT ops (on a CPU accelerator its comm op, checked at every start) under a file
    lock, `<torch extensions dir>/<python>/<op>/lock`. A process killed while building leaves it behind, and every
    later start then waits on it for ever without a word. Name any lock older than a build takes (the comm op:
    about a minute), on stderr, before the start can block on it; returns those locks."""
    from torch.utils.cpp_extension import get_default_build_root

    # torch's own choice: $TORCH_EXTENSIONS_DIR/<op>, else <default root>/<python and device>/<op>
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    stale = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # a build just finished
            continue
        if age > max_age_s:
            stale.append(lock)
            print(f"[sdt-dist] warning: {lock} is {age / 60:.0f} minutes old: a torch extension build that was "
                  "killed leaves this lock, and this start waits on it until it is gone. If no build is running, "
                  "delete it.", file=sys.stderr, flush=True)
    return stale


def _unlink_shm_workspace() -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op, used when all ranks share one host) maps a 69 MB shared-memory
    workspace per rank, `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`, and never
    unlinks it: every such job, finished or killed, left 69 MB of RAM per rank behind in /dev/shm (some 250 files
    after a day of tests here). Its initialisation returns only once the rank has mapped every peer's workspace;
    after a barrier all have, so the names can go: the mappings live on, and the memory is freed when the last
    process exits, however it exits."""
    from deepspeed.comm import comm as ds_comm

    if getattr(ds_comm.cdb, "shm_comm_op", None) is None:  # not a CPU accelerator: no such workspace
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def init_parallel(tp: int, pp: int, zero_stage: int) -> ParallelDims:
    init_distributed()
    world = dist.get_world_size()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    return ParallelDims(world_size=world, rank=dist.get_rank(), local_rank=local_rank, tp=tp, pp=pp,
                        dp=world // (tp * pp), zero_stage=zero_stage)


def destroy_parallel() -> None:
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())
