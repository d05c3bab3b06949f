"""What a running engine actually holds per rank, counted from its tensors, and the trainer's check of the
plan against it (and against the accelerator's memory counter)."""

from __future__ import annotations

import torch

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel() > 0:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def engine_tensor_bytes(tm) -> dict[str, int]:
    """Per-rank bytes of an `SDTrainModule`'s parameters, fp32 masters, Adam moments and teacher shard."""
    params = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_id") else p.data for p in tm.student.parameters()]
    # ZeRO-3's persistent parameters stay whole beside their partition
    params += [p.data for p in tm.student.parameters() if hasattr(p, "ds_id") and p.data.numel() > 0]
    opt = tm.engine.optimizer
    masters = next((getattr(opt, a) for a in _MASTER_ATTRS if getattr(opt, a, None)), [])
    inner = getattr(opt, "optimizer", opt)
    moments = [s[k] for s in inner.state.values() for k in _ADAM_KEYS if k in s]
    return {"parameters": _storage_bytes(params), "master_weights": _storage_bytes(list(masters)),
            "optimizer_state": _storage_bytes(moments), "teacher_shard": tm.teacher.shard.nbytes}


_QUIET_BELOW = 256 * 2**20  # a smaller planned peak is lost in the process's own memory (interpreter, libraries)


class PlanCheck:
    """Logs this rank's memory plan at start; after the first step, warns when the engine's tensors or the
    accelerator's memory counter (RSS on CPU) depart from the plan by more than `tolerance`."""

    def __init__(self, cfg, dims, log, tolerance: float = 0.2) -> None:
        from deepspeed.accelerator import get_accelerator

        from sdt_dist.plan.inventory import parameter_inventory
        from sdt_dist.plan.memory import run_layout, run_precision
        from sdt_dist.plan.report import make_plan

        self.accel = get_accelerator()
        self.baseline = self.accel.memory_allocated()
        self.accel.reset_max_memory_allocated()
        self.rank, self.tolerance, self.checked = dims.rank, tolerance, False
        layout = run_layout(cfg, dims.world_size)
        precision = run_precision(cfg, dims.dp, self.accel.device_name())
        plan = make_plan(cfg, parameter_inventory(cfg), layout, precision, None)
        self.stage = plan.stages[dims.pp_rank]
        terms = {**self.stage.exact, **self.stage.estimated}
        log(f"memory plan per rank (stage {self.stage.stage}, computed, sdt-plan): "
            + ", ".join(f"{k} {v / 2**30:.3f}" for k, v in terms.items())
            + f" GiB; peak at init {self.stage.init_peak / 2**30:.3f}, steady {self.stage.steady_peak / 2**30:.3f} GiB")

    def _warn(self, what: str, planned: int, measured: int) -> None:
        if planned and abs(measured - planned) > self.tolerance * planned:
            print(f"[sdt-dist] rank {self.rank}: WARNING {what} {measured / 2**30:.3f} GiB departs from the plan "
                  f"({planned / 2**30:.3f} GiB) by more than {self.tolerance:.0%}", flush=True)

    def after_step(self, tm) -> None:
        if self.checked:
            return
        self.checked = True
        if tm.frozen == 0:  # the plan's model states are those of the start (a resumed run may have frozen layers)
            for key, measured in engine_tensor_bytes(tm).items():
                self._warn(key, self.stage.exact[key], measured)
        if self.stage.steady_peak >= _QUIET_BELOW:
            self._warn("peak memory", self.stage.steady_peak, self.accel.max_memory_allocated() - self.baseline)
