"""Process groups of a run: torch.distributed + megatron-core parallel state, in one explicit object."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

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
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return (f"world={self.world_size} TP={self.tp} PP={self.pp} DP={self.dp} ZeRO={self.zero_stage}")


def init_distributed(timeout_s: int = 600) -> None:
    """Start torch.distributed through DeepSpeed (NCCL on CUDA, gloo/ccl on CPU: the accelerator decides).

    Works under the deepspeed launcher, torchrun, Slurm, and mpirun (DeepSpeed's MPI discovery), and as a
    single process with no launcher at all.
    """
    import deepspeed

    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ and "PMI_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)


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
