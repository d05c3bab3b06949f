"""The EMA teacher: theta_T <- tau * theta_T + (1 - tau) * theta_S after every optimizer step.

Storage is ZeRO-style: each data-parallel rank keeps only its 1/DP slice of every teacher parameter
(fp32, one flat tensor), laid out exactly like ZeRO-3 partitions the student (param i: ranks own
consecutive chunks of ceil(numel_i / DP) elements, zero-padded at the end). The update reads the
matching slice of the student on the same rank, so it needs no communication:
  * ZeRO-3: the rank's fp32 master partition (`safe_get_local_fp32_param`);
  * ZeRO-0/1/2: the slice of the student's (replicated) parameter.
The teacher forward runs in eval mode (no dropout), without LayerDrop and without autograd, and, as
ZeRO-3 does for the student, all-gathers one module at a time (the embedding, each layer, the final norm,
the head) over the data-parallel group and frees it right after it ran: at most one layer's weights are whole
at once, and the next module's gather (its buffer) is in flight while one runs. The slices travel in the compute
dtype. With a shared frozen trunk (`shared_trunk.py`) the embedding and the shared layers neither run nor are
gathered (a tied head still gathers the embedding). A pipeline stage instead keeps its pieces gathered over a
whole batch (`materialized`), since the engine interleaves their forwards with its own schedule;
`distill.teacher_gather=step` does the same without PP, so that accumulation steps do not each gather the model
again.
Parameters of frozen layers are copied (tau = 0), not averaged. Predictors are not part of the teacher.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from sdt_dist.config import Config
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
        self._copied: set[int] = set()  # frozen parameters already copied into the shard
        self.copied_version = 0  # moves whenever `copied` changes: a cheap key for what depends on it
        self.update(list(student.parameters()), tau=0.0)  # initialised equal to the student
        self._release(0, len(self.params))
        self.units = _gather_units(module, self.params)
        self._by_unit = False  # set during `forward`: the hooks below gather and free unit by unit
        self._held = False  # set inside `materialized`: every weight is whole already
        self._ran: set[int] = set()  # units that ran in the current forward
        self._next: tuple[int, torch.Tensor, Any] | None = None  # (unit, buffer, work): the all-gather in flight
        for k, (unit, _lo, _hi) in enumerate(self.units):
            unit.register_forward_pre_hook(lambda _m, _args, k=k: self._before_unit(k))
            unit.register_forward_hook(lambda _m, _args, _out, k=k: self._after_unit(k))
        self.peak_numel = 0  # most teacher elements whole at once in the last forward (tests, memory logs)

    # -- storage --------------------------------------------------------------------------------------
    def _student_slice(self, i: int, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of student parameter i, as a view where possible (no padding: the shard's
        padding is zero from the start and never written)."""
        if _numel(p) != self.numels[i]:
            raise ValueError(f"student parameter {i} has {_numel(p)} elements, teacher {self.numels[i]}")
        if _is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            # Frozen params have left the optimizer: their bit16 partition is all there is (and exact).
            local = safe_get_local_fp32_param(p) if p.requires_grad else None
            flat = (p.ds_tensor if local is None else local).detach().reshape(-1)
            return flat[:max(0, min(self.parts[i], self.numels[i] - self.dp_rank * self.parts[i]))]
        start = self.dp_rank * self.parts[i]
        return p.detach().reshape(-1)[start:start + self.parts[i]]

    def _shard_slice(self, i: int, n: int) -> torch.Tensor:
        return self.shard[self.offsets[i]:self.offsets[i] + n]

    @torch.no_grad()
    def update(self, student_params: list[torch.nn.Parameter], tau: float,
               copy_indices: frozenset[int] = frozenset()) -> None:
        """In-place EMA on this rank's slice; `copy_indices` (frozen params) are copied, not averaged.

        One fused `_foreach_lerp_` over all averaged slices. A frozen parameter never changes again, so once
        copied it needs no more work: later calls skip it (`load_state_dict` forgets what was copied)."""
        if len(student_params) != len(self.params):
            raise ValueError("student and teacher parameter lists differ in length")
        dst_avg, src_avg = [], []
        for i, p in enumerate(student_params):
            if tau != 0.0 and i in copy_indices and i in self._copied:
                continue
            src = self._student_slice(i, p)
            dst = self._shard_slice(i, src.numel())
            if tau == 0.0 or i in copy_indices:
                dst.copy_(src)
                if i in copy_indices and i not in self._copied:
                    self._copied.add(i)
                    self.copied_version += 1
            else:
                dst_avg.append(dst)
                src_avg.append(src if src.dtype == dst.dtype else src.float())
        if dst_avg:
            torch._foreach_lerp_(dst_avg, src_avg, 1.0 - tau)

    def _start_gather(self, lo: int, hi: int, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """[DP, n] of every rank's slices of parameters lo..hi-1 in `dtype`, and the work of the all-gather over the
        data-parallel group that fills it (None at DP = 1: the shard itself). Each rank casts its slice before it
        travels, so a bf16 forward moves half the bytes of the fp32 shard (the same values: the cast is
        elementwise)."""
        local = self.shard[self.offsets[lo]:self.offsets[hi - 1] + self.parts[hi - 1]]
        if self.dp_size == 1:
            return local.unsqueeze(0), None
        full = torch.empty(self.dp_size, local.numel(), dtype=dtype, device=local.device)
        mine = full[self.dp_rank].copy_(local)  # cast into this rank's row, then gathered in place
        return full, dist.all_gather_single(full.view(-1), mine, group=self.dp_group, async_op=True)

    def _gather(self, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
        full, work = self._start_gather(lo, hi, dtype)
        if work is not None:
            work.wait()
        return full

    def _unflatten(self, full: torch.Tensor, i: int, lo: int = 0) -> torch.Tensor:
        start = self.offsets[i] - self.offsets[lo]
        chunk = full[:, start:start + self.parts[i]].reshape(-1)
        return chunk[:self.numels[i]].view(self.shapes[i])

    def _materialize(self, lo: int, hi: int) -> None:
        self._assign(self._gather(lo, hi, self.compute_dtype), lo, hi)

    def _assign(self, full: torch.Tensor, lo: int, hi: int) -> None:
        for i in range(lo, hi):
            # With one DP rank in fp32 the weights are views of the shard itself: nothing is copied (the
            # forward never writes them, and they are released before the next update). At one DP rank in
            # 16 bits, cast here; over DP > 1 a parameter's slices lie in DP rows of `full`: one copy joins them.
            self.params[i].data = self._unflatten(full, i, lo).to(self.compute_dtype)
        whole = sum(p.numel() for p in self.params)
        self.peak_numel = max(self.peak_numel, whole)

    def _release(self, lo: int, hi: int) -> None:
        for p in self.params[lo:hi]:
            p.data = torch.empty(0, dtype=self.compute_dtype, device=self.shard.device)

    def _before_unit(self, k: int) -> None:
        """Unit k's weights whole for its forward; then the next unit's all-gather starts, to overlap this forward
        (not when the next has run already: a tied head runs the embedding again after the last unit)."""
        if not self._by_unit:
            return
        _, lo, hi = self.units[k]
        if self._next is not None and self._next[0] == k:
            _, full, work = self._next
            self._next = None
            work.wait()
            self._assign(full, lo, hi)
            del full, work  # joined into the parameters: freed before the next buffer exists
        else:
            self._materialize(lo, hi)
        self._ran.add(k)
        if self.dp_size > 1 and k + 1 < len(self.units) and k + 1 not in self._ran and self._next is None:
            _, next_lo, next_hi = self.units[k + 1]
            self._next = (k + 1, *self._start_gather(next_lo, next_hi, self.compute_dtype))

    def _after_unit(self, k: int) -> None:
        if self._by_unit:
            self._release(*self.units[k][1:])

    def full_parameters(self) -> list[torch.Tensor]:
        """Gathered fp32 teacher parameters (for tests and export; a collective over the DP group)."""
        full = self._gather(0, len(self.params), torch.float32)
        return [self._unflatten(full, i).clone() for i in range(len(self.params))]

    @contextlib.contextmanager
    def materialized(self) -> Iterator[None]:
        """All of this rank's teacher weights gathered for the duration (a pipeline stage, or with
        `distill.teacher_gather=step`, over a batch): `forward` then gathers nothing. Gathered module by module, so
        that besides the whole teacher at most one module's gather buffer exists."""
        for _, lo, hi in self.units:
            self._materialize(lo, hi)
        self._held = True
        try:
            yield
        finally:
            self._held = False
            self._release(0, len(self.params))

    @property
    def copied(self) -> frozenset[int]:
        """Indices of the frozen parameters copied from the student since the last load: equal to the student's."""
        return frozenset(self._copied)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, trunk: dict[int, torch.Tensor] | None = None) -> GPTOutput:
        """The teacher's GPT forward, its weights gathered module by module. `trunk`: the student's output states
        of layers 1..j, which equal the teacher's (`distill/shared_trunk.py`): the embedding and those layers
        neither run nor are gathered."""
        if self._held:
            return self.module(tokens, trunk=trunk)
        self._by_unit, self.peak_numel, self._ran = True, 0, set()
        try:
            return self.module(tokens, trunk=trunk)
        finally:
            self._by_unit = False
            if self._next is not None:  # a gather no unit took (after an error): every rank started it
                self._next[2].wait()
                self._next = None
            self._release(0, len(self.params))

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
        self._copied.clear()
        self.copied_version += 1

    @torch.no_grad()
    def load_full_parameters(self, values: list[torch.Tensor]) -> None:
        """Take this rank's slice of whole teacher parameters (this TP shard's, in `params` order): how a run at
        another data-parallel size takes over the teacher of a checkpoint (`sdt_dist/checkpoint/relayout.py`)."""
        if [v.numel() for v in values] != self.numels:
            raise ValueError("teacher values do not match this rank's teacher parameters")
        self.shard.zero_()
        for i, v in enumerate(values):
            start = self.dp_rank * self.parts[i]
            part = v.detach().reshape(-1)[start:start + self.parts[i]]
            self._shard_slice(i, part.numel()).copy_(part)
        self._copied.clear()
        self.copied_version += 1

    def local_numel(self) -> int:
        return self.shard.numel()

    def full_numel(self) -> int:
        return sum(self.numels)

    def largest_unit_numel(self) -> int:
        """Elements whole at once during `forward`: the largest module gathered."""
        return max(sum(self.numels[lo:hi]) for _, lo, hi in self.units)


def gathered_per_step(cfg: Config) -> bool:
    """Whether a run gathers the teacher whole once per step (`materialized`) instead of module by module in every
    forward: under pipeline parallelism (the engine interleaves the stages' forwards), or when
    `distill.teacher_gather=step` asks for it."""
    return cfg.parallel.pipeline > 1 or cfg.distill.teacher_gather == "step"


def _gather_units(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[tuple[torch.nn.Module, int, int]]:
    """The modules gathered one at a time, with the [lo, hi) range of their parameters in `params`: the
    direct children that own parameters, each element of a ModuleList (the decoder layers) on its own."""
    index = {id(p): i for i, p in enumerate(params)}
    children = [c for child in module.children()
                for c in (child if isinstance(child, torch.nn.ModuleList) else [child])]
    units = []
    for child in children:
        ids = sorted(index[id(p)] for p in child.parameters())
        if ids:
            if ids != list(range(ids[0], ids[-1] + 1)):
                raise ValueError(f"parameters of {type(child).__name__} are not contiguous in the teacher's order")
            units.append((child, ids[0], ids[-1] + 1))
    if sum(hi - lo for _, lo, hi in units) != len(params):
        raise ValueError("some teacher parameters belong to no gather unit")
    return units
