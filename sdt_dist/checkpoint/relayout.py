"""Resume a checkpoint at another TP x PP x DP x ZeRO layout, from its layout-independent state.

DeepSpeed's files and the per-rank teacher shards are cut for the layout that wrote them. Next to them every
checkpoint holds `export/` (whole student and teacher weights) and, with `train.save_full_optimizer` (the
default), `full_optimizer.safetensors`: the fp32 master weight and Adam moments of every trainable parameter,
whole (ZeRO-gathered, TP-gathered, pipeline stages merged) under names no layout changes (`gpt.<name>`,
`predictors.<name>`), plus Adam's step count. A run at another layout builds its engine as usual, freezes the
layers the checkpoint had frozen (so its optimizer holds the same parameters), then takes its TP shard of every
weight and moment (DeepSpeed partitions them over DP), its DP slice of the teacher, and the step and data
position (`consumed_samples` counts global samples, so any DP size continues at the same sample).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdt_dist.checkpoint.layout import FULL_OPTIMIZER
from sdt_dist.export import gather_full_state
from sdt_dist.init_from import local_shard
from sdt_dist.parallel.optimizer_state import restore_optimizer_state, snapshot_optimizer_state

_KINDS = ("fp32", "exp_avg", "exp_avg_sq")
_STEP = "adam_step"


def full_optimizer_state(tm) -> dict[str, torch.Tensor]:
    """`<kind>/<name>` -> whole tensor for every trainable parameter, and `adam_step` (collective over all
    ranks; complete on global rank 0)."""
    kept = [(n, p) for n, p in tm.named_student_parameters() if p.requires_grad]
    snap = snapshot_optimizer_state(tm.engine, [p for _, p in kept])
    named, tensors = [], []
    for (name, p), entry in zip(kept, snap["params"]):
        for kind in _KINDS:
            if kind in entry:
                named.append((f"{kind}/{name}", p))
                tensors.append(entry[kind])
    out = gather_full_state(named, tensors, tm.dims.tp_split, tm.dims.pp_split)
    if snap["step"] is not None and out:
        out[_STEP] = snap["step"].detach().float().reshape(1).cpu()
    return out


def save_full_optimizer(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file(state, str(path / FULL_OPTIMIZER), metadata={"format": "sdt-dist full optimizer state 1"})
    (path / FULL_OPTIMIZER).chmod(0o644)


@torch.no_grad()
def _set_weight(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    import deepspeed

    # ZeRO-3: gather, set on every rank of the group, re-partition from the group's first rank
    with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
        if tuple(p.shape) != tuple(value.shape):
            raise ValueError(f"checkpoint tensor is {tuple(value.shape)}, the parameter {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))


def load_at_new_layout(tm, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, teacher, freezing and data position of checkpoint `path` into `tm`, built at
    any layout. Returns the saved trainer state (step, consumed_samples, frozen_layers, rank 0's RNG)."""
    extra = torch.load(path / "rank_00000.pt", map_location="cpu", weights_only=True)
    tm.train_predictors(extra.get("predictors_trained", True))  # as `checkpoint.load`
    tm.freeze(extra["frozen_layers"], carry_state=False)  # the optimizer now holds the saved one's parameters
    opt = load_file(str(path / FULL_OPTIMIZER))
    student = load_file(str(path / "export" / "student.safetensors"))
    tp_group = tm.dims.tp_split
    kept, entries = [], []
    for name, p in tm.named_student_parameters():
        # a trainable parameter's fp32 master is exact even under bf16; a frozen one's weight is in the export
        full = opt.get(f"fp32/{name}", student.get(name.removeprefix("gpt.")))
        if full is None or (p.requires_grad and f"fp32/{name}" not in opt):
            raise ValueError(f"{path / FULL_OPTIMIZER}: no state for {name} (trainable: {p.requires_grad})")
        _set_weight(p, local_shard(full, p, tp_group))
        if p.requires_grad:
            kept.append(p)
            entries.append({k: local_shard(opt[f"{k}/{name}"], p, tp_group) for k in _KINDS if f"{k}/{name}" in opt})
    step = opt.get(_STEP)
    restore_optimizer_state(tm.engine, kept, {"step": None if step is None else step.reshape(()), "params": entries})
    teacher = load_file(str(path / "export" / "teacher.safetensors"))
    names = {id(p): n for n, p in tm.teacher_gpt.named_parameters()}
    tm.teacher.load_full_parameters([local_shard(teacher[names[id(p)]], p, tp_group) for p in tm.teacher.params])
    return extra
