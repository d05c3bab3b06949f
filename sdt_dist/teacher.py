"""The EMA teacher: theta_T <- tau * theta_T + (1 - tau) * theta_S after every optimizer step.

Storage is ZeRO-style: each data-parallel rank keeps only its 1/DP slice of every teacher parameter
(fp32, one flat tensor), laid out exactly like ZeRO-3 partitions the student (param i: ranks own
consecutive chunks of ceil(numel_i / DP) elements, zero-padded at the end). The update reads the
matching slice of the student on the same rank, so it needs no communication:
  * ZeRO-3: the rank's fp32 master partition (`safe_get_local_fp32_param`);
  * ZeRO-0/1/2: the slice of the student's (replicated) parameter.
The teacher forward all-gathers the slices into the teacher module over the data-parallel group, runs
in eval mode (no dropout), without LayerDrop and without autograd, and frees the gathered weights.
Parameters of frozen layers are copied (tau = 0), not averaged. Predictors are not part of the teacher.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from sdt_dist.model.gpt import GPTOutput


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _numel(p: torch.nn.Parameter) -> int:
    return p.ds_numel if _is_zero3(p) else p.numel()


class EmaTeacher:
    def __init__(self, module: torch.nn.Module, student: torch.nn.Module, dp_group: dist.ProcessGroup | None,
                 compute_dtype: torch.dtype) -> None:
        """`module`: the teacher's modules on this rank (a GPTModel, or a pipeline stage's pieces); `student`:
        the matching student modules, parameters in the same order."""
        self.module = module.eval()
        self.module.requires_grad_(False)
        self.dp_group = dp_group
        self.dp_size = 1 if dp_group is None else dist.get_world_size(dp_group)
        self.dp_rank = 0 if dp_group is None else dist.get_rank(dp_group)
        self.compute_dtype = compute_dtype
        self.params = list(module.parameters())
        self.shapes = [p.shape for p in self.params]
        names_t = [n for n, _ in module.named_parameters()]
        names_s = [n for n, _ in student.named_parameters()]
        if names_t != names_s:
            raise ValueError("teacher and student parameters differ; they must share one architecture")
        self.numels = [math.prod(s) for s in self.shapes]
        self.parts = [math.ceil(n / self.dp_size) for n in self.numels]
        self.offsets = [0]
        for part in self.parts[:-1]:
            self.offsets.append(self.offsets[-1] + part)
        device = next(student.parameters()).device
        self.shard = torch.zeros(sum(self.parts), dtype=torch.float32, device=device)
        self.update(list(student.parameters()), tau=0.0)  # initialised equal to the student
        self._release()

    # -- storage --------------------------------------------------------------------------------------
    def _student_slice(self, i: int, p: torch.nn.Parameter) -> torch.Tensor:
        if _numel(p) != self.numels[i]:
            raise ValueError(f"student parameter {i} has {_numel(p)} elements, teacher {self.numels[i]}")
        if _is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            # Frozen params have left the optimizer: their bit16 partition is all there is (and exact).
            local = safe_get_local_fp32_param(p) if p.requires_grad else None
            return (p.ds_tensor if local is None else local).detach().reshape(-1).float()
        start = self.dp_rank * self.parts[i]
        flat = p.detach().reshape(-1)[start:start + self.parts[i]].float()
        if flat.numel() < self.parts[i]:  # the last rank's chunk is zero-padded
            flat = torch.nn.functional.pad(flat, (0, self.parts[i] - flat.numel()))
        return flat

    @torch.no_grad()
    def update(self, student_params: list[torch.nn.Parameter], tau: float,
               copy_indices: frozenset[int] = frozenset()) -> None:
        """In-place EMA on this rank's slice; `copy_indices` (frozen params) are copied, not averaged."""
        if len(student_params) != len(self.params):
            raise ValueError("student and teacher parameter lists differ in length")
        for i, p in enumerate(student_params):
            dst = self.shard[self.offsets[i]:self.offsets[i] + self.parts[i]]
            src = self._student_slice(i, p)
            if tau == 0.0 or i in copy_indices:
                dst.copy_(src)
            else:
                dst.lerp_(src, 1.0 - tau)

    def _gather(self) -> torch.Tensor:
        """[DP, shard] of every rank's slice (a collective over the data-parallel group)."""
        if self.dp_size == 1:
            return self.shard.unsqueeze(0)
        full = torch.empty(self.dp_size, self.shard.numel(), dtype=self.shard.dtype, device=self.shard.device)
        dist.all_gather(list(full.unbind(0)), self.shard, group=self.dp_group)
        return full

    def _unflatten(self, full: torch.Tensor, i: int) -> torch.Tensor:
        chunk = full[:, self.offsets[i]:self.offsets[i] + self.parts[i]].reshape(-1)
        return chunk[:self.numels[i]].view(self.shapes[i])

    def _materialize(self) -> None:
        full = self._gather()
        for i, p in enumerate(self.params):
            p.data = self._unflatten(full, i).to(self.compute_dtype, copy=True)

    def _release(self) -> None:
        for p in self.params:
            p.data = torch.empty(0, dtype=self.compute_dtype, device=self.shard.device)

    def full_parameters(self) -> list[torch.Tensor]:
        """Gathered fp32 teacher parameters (for tests and export; a collective over the DP group)."""
        full = self._gather()
        return [self._unflatten(full, i).clone() for i in range(len(self.params))]

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """Teacher weights gathered for the duration (a pipeline stage keeps them over a whole batch)."""
        self._materialize()
        try:
            yield
        finally:
            self._release()

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> GPTOutput:
        with self.materialized():
            return self.module(tokens)

    __call__ = forward

    # -- checkpoint (per rank: each rank saves its own slice) -------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"shard": self.shard.cpu().clone(), "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "numels": self.numels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dp_size"] != self.dp_size or state["numels"] != self.numels:
            raise ValueError(f"teacher checkpoint layout (DP={state['dp_size']}) does not match this run "
                             f"(DP={self.dp_size}); resume with the same parallel layout")
        self.shard.copy_(state["shard"].to(self.shard.device))

    def local_numel(self) -> int:
        return self.shard.numel()

    def full_numel(self) -> int:
        return sum(self.numels)
