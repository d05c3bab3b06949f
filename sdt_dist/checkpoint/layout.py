"""Whether a resume changes the parallel layout, and, before any process group exists, whether it may.

A checkpoint's DeepSpeed files and per-rank teacher shards are cut for the layout that wrote them (TP shards,
pipeline stages, ZeRO partitions over DP ranks). A resume at another layout reads the checkpoint's
layout-independent state instead (`export/` + `full_optimizer.safetensors`, `sdt_dist/checkpoint/relayout.py`); a
checkpoint without it (written with `train.save_full_optimizer=false`, or before that file existed) resumes
only at its own layout, and another layout is refused here, naming both and the supported ways.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdt_dist.config import Config, ConfigError

FULL_OPTIMIZER = "full_optimizer.safetensors"  # sdt_dist/checkpoint/relayout.py writes it (that module imports torch)


def _layout(world: int, tp: int, pp: int, zero: int) -> str:
    # the format of ParallelDims.describe()
    return f"world={world} TP={tp} PP={pp} DP={world // (tp * pp)} ZeRO={zero}"


def saved_layout(path: Path) -> str:
    meta = json.loads((Path(path) / "meta.json").read_text())
    p = meta["config"]["parallel"]
    return _layout(meta["world_size"], p["tensor"], p["pipeline"], p["zero_stage"])


def layout_changed(path: Path, dims) -> bool:
    """Whether checkpoint `path` was written at another layout than `dims` (a ParallelDims)."""
    return saved_layout(path) != dims.describe()


def check_resume_layout(cfg: Config, world_size: int) -> None:
    """ConfigError naming both layouts when the checkpoint `train.resume` selects was written at another one and
    holds no layout-independent optimizer state."""
    from sdt_dist import checkpoint

    try:
        path = checkpoint.resolve(cfg.train.resume, Path(cfg.train.out_dir) / "checkpoints")
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if path is None:
        return
    saved = saved_layout(path)
    p = cfg.parallel
    now = _layout(world_size, p.tensor, p.pipeline, p.zero_stage)
    if saved != now and not (path / FULL_OPTIMIZER).is_file():
        raise ConfigError(
            f"train.resume: checkpoint {path} was written at {saved}, this run is {now}, and it holds no "
            f"layout-independent optimizer state ({FULL_OPTIMIZER}: saved with train.save_full_optimizer=false "
            f"or by an older sdt-dist), so it resumes only at its own layout. Resume at {saved} (its next "
            f"checkpoints, saved with train.save_full_optimizer=true, then resume at any layout), or continue at "
            f"this layout from its weights alone (optimizer state, teacher history and data position start "
            f"fresh): a new run with --set train.init_from={path}/export --set train.out_dir=<a new directory>")
