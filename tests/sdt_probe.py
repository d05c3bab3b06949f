"""Drive an SDTrainModule on synthetic batches and record what the tests check (in-process or per rank)."""

from __future__ import annotations

import deepspeed
import torch

from sdt_dist.config import Config
from sdt_dist.parallel.dims import ParallelDims
from sdt_dist.parallel.optimizer_state import optimizer_state_numel
from sdt_dist.plan.measure import engine_tensor_bytes
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import random_batch


def full_student_params(tm: SDTrainModule) -> list[torch.Tensor]:
    out = []
    for p in tm.student_gpt_params():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out.append(p.detach().float().clone())
    return out


def run(cfg: Config, dims: ParallelDims, steps: int, batch_seed: int = 100) -> dict:
    """Train `steps` steps; global batch b comes from seed batch_seed+step and is split over DP ranks."""
    tm = SDTrainModule(cfg, dims)
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
    return {"engine_bytes": engine_bytes, "tm": tm, "records": records, "history": history, "teacher0": teacher0,
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
