"""Refuse, before any process group exists, to resume a checkpoint written at another parallel layout.

A checkpoint's DeepSpeed files and per-rank teacher shards are cut for the layout that wrote them (TP shards,
pipeline stages, ZeRO partitions over DP ranks); loading them at another layout fails deep inside DeepSpeed or,
worse, mixes shards. Changing the layout is supported through the layout-independent export, weights only.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdt_dist.config import Config, ConfigError


def _layout(world: int, tp: int, pp: int, zero: int) -> str:
    return f"world={world} TP={tp} PP={pp} DP={world // (tp * pp)} ZeRO={zero}"


def check_resume_layout(cfg: Config, world_size: int) -> None:
    """ConfigError naming both layouts when the checkpoint `train.resume` selects was written at another one."""
    from sdt_dist import checkpoint

    try:
        path = checkpoint.resolve(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if path is None:
        return
    meta = json.loads((path / "meta.json").read_text())
    saved_parallel = meta["config"]["parallel"]
    saved = _layout(meta["world_size"], saved_parallel["tensor"], saved_parallel["pipeline"],
                    saved_parallel["zero_stage"])
    p = cfg.parallel
    now = _layout(world_size, p.tensor, p.pipeline, p.zero_stage)
    if saved != now:
        raise ConfigError(
            f"train.resume: checkpoint {path} was written at {saved}, this run is {now}; a checkpoint resumes only "
            f"at its own layout. To continue at this layout from its weights (optimizer state, teacher history and "
            f"data position start fresh), start a new run with --set train.init_from={path}/export "
            f"--set train.out_dir=<a new directory>, or resume at {saved}")
