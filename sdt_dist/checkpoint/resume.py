"""What a run resumes from, and whether it may: the newest checkpoint that verifies, with a config that
agrees with the one the checkpoint was trained with.

`train.resume=auto` walks the complete checkpoints newest first and takes the first whose files match
their recorded checksums, saying which file of each newer one is damaged; an explicit `train.resume=PATH`
that is damaged is refused. A run-defining config key (model shape, layout, distillation, data, seed, ...)
that differs from the checkpoint's is refused too; the keys in MAY_CHANGE are deliberate changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from sdt_dist.checkpoint import complete_checkpoints, resolve
from sdt_dist.checkpoint.integrity import CheckpointDamaged, verify
from sdt_dist.config import ConfigError

# Run length, LR peak and floor, cadences, paths, the AdamW kernel (the same state, equal steps up to rounding),
# how the teacher is gathered (the same numbers) and logging may change on resume; data.source only names what
# `data.prepared` was built from (the tokenizer hash is compared separately).
MAY_CHANGE = frozenset({
    "train.out_dir", "train.max_steps", "train.lr", "train.min_lr", "train.save_interval", "train.eval_interval",
    "train.eval_samples", "train.keep_checkpoints", "train.resume", "train.max_skipped_steps",
    "train.save_full_optimizer", "train.optimizer_impl", "distill.teacher_gather",
    "data.source", "data.workers", "data.verify_checksums",
})
MAY_CHANGE_SECTIONS = ("logging.",)
# A resume at another layout reads the checkpoint's layout-independent state (sdt_dist/checkpoint/relayout.py): the
# parallel section may then change as a whole.
RELAYOUT_SECTIONS = ("parallel.",)


def _unverified(path: Path, log: Callable[[str], None]) -> None:
    log(f"{path} records no checksums (written by an older sdt-dist): resuming without verifying it")


def choose(resume: str, ckpt_root: Path, log: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from, verified. Reads every byte of it: call on one rank."""
    if resume != "auto":
        path = resolve(resume, ckpt_root)
        if path is not None and not verify(path):
            _unverified(path, log)
        return path
    for path in reversed(complete_checkpoints(ckpt_root)):
        try:
            if not verify(path):
                _unverified(path, log)
            return path
        except CheckpointDamaged as e:
            log(f"checkpoint damaged, falling back to the previous one: {e}")
    return None


def choose_on_all_ranks(resume: str, ckpt_root: Path, is_main: bool, log: Callable[[str], None]) -> Path | None:
    """`choose` on rank 0, its answer (or its error) on every rank: no rank is left in a collective."""
    answer: list[Any] = [None]
    if is_main:
        try:
            path = choose(resume, ckpt_root, log)
            answer[0] = ("ok", None if path is None else str(path))
        except (CheckpointDamaged, FileNotFoundError) as e:
            answer[0] = (type(e).__name__, str(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "CheckpointDamaged":
        raise CheckpointDamaged(value)
    if kind == "FileNotFoundError":
        raise FileNotFoundError(value)
    return None if value is None else Path(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any], relayout: bool = False) -> list[str]:
    """Run-defining keys whose value differs, as `key: saved -> current`. A key the saved config lacks (added
    to sdt-dist after the checkpoint was written; its default keeps the old behaviour) is not comparable.
    `relayout`: the run resumes at another parallel layout, so `parallel.*` may differ."""
    may_change = MAY_CHANGE_SECTIONS + (RELAYOUT_SECTIONS if relayout else ())
    old, new = _flatten(saved), _flatten(current)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and k not in MAY_CHANGE and not k.startswith(may_change)]


def check_config(path: Path, saved: dict[str, Any], current: dict[str, Any], relayout: bool = False) -> None:
    changes = config_changes(saved, current, relayout)
    if changes:
        raise ConfigError(f"{', '.join(c.split(':')[0] for c in changes)}: differ from the config checkpoint {path} "
                          f"was trained with ({'; '.join(changes)}). Resume with the same values, or start a new "
                          f"run (train.resume=none, another train.out_dir). Keys that may change on resume: "
                          f"{', '.join(sorted(MAY_CHANGE))}, logging.*")
