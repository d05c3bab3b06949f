"""Crash-safe checkpoints of everything that determines the future of a run.

Layout under `<run>/checkpoints/`:
  step_00000120/            one complete checkpoint
    <DeepSpeed files>       student + predictors + optimizer (any ZeRO stage, per-rank partitions)
    rank_00000.pt ...       per rank: teacher shard, RNG states, step, consumed samples, frozen layers
    export/                 full student and teacher weights (safetensors), loadable at any layout
    full_optimizer.safetensors  whole fp32 masters + Adam moments (train.save_full_optimizer): with export/,
                            what a resume at another layout reads (`relayout.py`)
    meta.json               config, tokenizer hash, world layout, size + sha256 of every other file
                            (written last, by rank 0; `integrity.py` verifies them on resume)
  latest                    the tag of the newest complete checkpoint (replaced atomically)
  zero_to_fp32.py, zero_to_torch.py   DeepSpeed's consolidation scripts, replaced by ones that refuse and
                            point at export/ (DeepSpeed's would silently drop the frozen parameters)
A checkpoint is written under `.tmp-<tag>` and renamed only after every rank has finished, so a crash
while saving leaves the previous one intact and `latest` never points at a partial directory.
Per-rank state goes in per-rank files: under ZeRO-1/2 DeepSpeed's client_state is kept from rank 0 only.

This package: saving and loading (here), `resume.py` (which checkpoint a run resumes from, and whether its
config agrees), `layout.py` (whether a resume changes the parallel layout, checked before any process group),
`relayout.py` (resuming at another layout), `integrity.py` (the sha256 of every file), and
`consolidation_guard.py` (DeepSpeed's consolidation scripts replaced by ones that refuse).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sdt_dist.atomic import write_json_atomic, write_text_atomic
from sdt_dist.checkpoint.consolidation_guard import replace_consolidation_scripts
from sdt_dist.checkpoint.integrity import file_digests
from sdt_dist.checkpoint.layout import layout_changed
from sdt_dist.checkpoint.relayout import full_optimizer_state, load_at_new_layout, save_full_optimizer
from sdt_dist.export import export
from sdt_dist.faults import maybe_die
from sdt_dist.train_module import SDTrainModule

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:])}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def save(tm: SDTrainModule, ckpt_root: Path, step: int, consumed_samples: int, meta: dict[str, Any],
         keep: int) -> Path:
    """Save the state after `step` completed steps, with a layout-independent export of the student and
    teacher weights (`export/`). Collective: call on every rank."""
    tag = _tag(step)
    tmp_tag = f".tmp-{tag}"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(ckpt_root / tmp_tag, ignore_errors=True)  # leftovers of a crash mid-save
    dist.barrier()
    tm.engine.save_checkpoint(str(ckpt_root), tag=tmp_tag, save_latest=False)
    extra = {"step": step, "consumed_samples": consumed_samples, "frozen_layers": tm.frozen,
             "predictors_trained": tm.predictors_trained, "teacher": tm.teacher.state_dict(), "rng": rng_state()}
    torch.save(extra, ckpt_root / tmp_tag / f"rank_{rank:05d}.pt")
    student, teacher = tm.export_state()
    full_optimizer = full_optimizer_state(tm) if tm.cfg.train.save_full_optimizer else None
    maybe_die("save", step)
    dist.barrier()
    if rank == 0:
        # DeepSpeed 0.19 copies them next to the tags (into ckpt_root) at every save; they would miss frozen params
        replace_consolidation_scripts(ckpt_root)
        replace_consolidation_scripts(ckpt_root / tmp_tag)
        export(ckpt_root / tmp_tag / "export", tm.cfg.model, student, teacher)
        if full_optimizer is not None:
            save_full_optimizer(ckpt_root / tmp_tag, full_optimizer)
        # every rank's files are complete (barrier above): record their checksums for the resume to verify
        meta = {**meta, "files": file_digests(ckpt_root / tmp_tag)}
        write_json_atomic(ckpt_root / tmp_tag / "meta.json", meta, sort_keys=True)
        final = ckpt_root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_root / tmp_tag, final)
        write_text_atomic(ckpt_root / LATEST, tag)
        for old in complete_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt_root / tag


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory is complete once renamed from .tmp-*)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "meta.json").is_file())


def resolve(resume: str, ckpt_root: Path) -> Path | None:
    """`auto`: the newest complete checkpoint (or None); `none`: None; else a checkpoint directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"train.resume: {path} is not a complete sdt-dist checkpoint (no meta.json)")
    return path


# Globals DeepSpeed's own checkpoint files legitimately reference (seen in ZeRO 0-3 and pipeline files).
_SAFE_DEEPSPEED_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def refuse_unsafe_pickles(path: Path) -> None:
    """DeepSpeed loads its files with `weights_only=False`, which would run any code a tampered pickle
    carries: inspect every pickle first (without executing it) and refuse unknown globals."""
    for file in sorted(path.glob("*.pt")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except (ValueError, RuntimeError, OSError) as e:  # e.g. a legacy raw pickle, not a torch.save archive
            raise ValueError(f"{file}: not a file written by torch.save ({e}); refusing to load it") from None
        unsafe = set(found) - _SAFE_DEEPSPEED_GLOBALS
        if unsafe:
            raise ValueError(f"{file}: refusing to load a checkpoint file that references {sorted(unsafe)}; "
                             f"it was not written by sdt-dist/DeepSpeed or has been tampered with")


def load(tm: SDTrainModule, path: Path) -> dict[str, Any]:
    """Restore module, optimizer, teacher and RNG state; returns the per-rank extra state. A checkpoint written at
    another layout is read from its layout-independent state (`relayout.py`; RNG: rank 0's on every rank)."""
    refuse_unsafe_pickles(path)
    if layout_changed(path, tm.dims):
        extra = load_at_new_layout(tm, path)
        set_rng_state(extra["rng"])
        return extra
    rank = dist.get_rank()
    extra_path = path / f"rank_{rank:05d}.pt"
    if not extra_path.is_file():
        raise FileNotFoundError(f"{extra_path} is missing: the checkpoint was written by a different "
                                f"number of ranks; resume with the same layout")
    extra = torch.load(extra_path, map_location="cpu", weights_only=True)
    # The optimizer's parameter groups must match the saved ones: freeze first, then load. Checkpoints older
    # than the key always trained the predictors (a run without alignment too)
    tm.train_predictors(extra.get("predictors_trained", True))
    tm.freeze(extra["frozen_layers"], carry_state=False)
    load_path, _ = tm.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    tm.teacher.load_state_dict(extra["teacher"])
    set_rng_state(extra["rng"])
    return extra
