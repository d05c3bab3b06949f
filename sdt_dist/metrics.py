"""Metrics sinks of rank 0: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars and,
optionally, Weights & Biases (imported only when enabled; the run id is kept in `<run>/wandb_run_id` so that
a resumed job continues the same W&B run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The logged records of a run directory (or a metrics.jsonl file), one per step, sorted by step; [] when
    there is none. A resumed run logs the steps after its checkpoint again: the last record of a step wins (the
    final trajectory is the resumed one). A last line cut by a crash mid-write is skipped."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise ValueError(f"{path}:{n}: not a JSON object") from None
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, wandb_project: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # line-buffered: a crash loses nothing
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb_project is not None:
            import wandb  # optional extra: config validation has checked that it is installed

            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self._wandb = wandb.init(project=wandb_project, name=run_dir.name, id=run_id, resume="allow",
                                     dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
