"""Sweep results that outlive their run directories.

Each evaluated arm leaves a small JSON record under the sweep's `records` directory (committed beside the
tables): its config, its eval report and its learning curve. The tables read an arm's run directory first
and its record otherwise, found by config rather than by variant name, so neither a lost run directory (a
new machine) nor a renamed variant (an arm that became the default recipe) drops a seed from a table.

A record file is `<records>/<variant>/seed<k>.json`:
  {"variant", "seed", "weights", "config": Config.to_dict(), "eval": eval.json, "curve": [[step, val_ppl], ...]}
A group curve `<records>/<variant>/curve_group.json` holds a learning curve known only as mean and std over
several seeds (from an aggregate whose runs are gone): {"config", "seeds", "steps", "ppl_mean", "ppl_std"}.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sdt_dist.atomic import write_json_atomic
from sdt_dist.eval.sweep_spec import Arm, SweepSpec, recorded_identity, run_identity
from sdt_dist.metrics import read_metrics


def curve_of(arm: Arm) -> list[list[float]]:
    """[step, validation perplexity] at the run's evaluation steps; empty for an arm that evaluates another
    arm's weights (its run logs the student's perplexity, not its own)."""
    if arm.variant.train_as is not None:
        return []
    return [[r["step"], r["val_ppl"]] for r in read_metrics(arm.train_dir) if r.get("val_ppl") is not None]


def write_record(spec: SweepSpec, arm: Arm, report: dict[str, Any]) -> Path | None:
    """Keep an evaluated arm's result under spec.records (no-op without one)."""
    if spec.records is None:
        return None
    path = spec.records / arm.variant.name / f"seed{arm.seed}.json"
    write_json_atomic(path, {"variant": arm.variant.name, "seed": arm.seed, "weights": arm.variant.weights,
                             "config": arm.config.to_dict(), "eval": report, "curve": curve_of(arm)})
    return path


_SEED_FILE = re.compile(r"seed-?\d+\.json")  # what f"seed{arm.seed}.json" can name
_Candidates = list[tuple[dict[str, Any] | None, dict[str, Any]]]  # (recorded_identity, record), path order


class RecordIndex:
    """Every record and group curve under a records directory, each file read and its config converted once
    (an aggregation looks up every arm, often several times). A lookup compares the arm's config only with
    the candidates of its seed (and weights); of several matches, the first in sorted path order wins."""

    def __init__(self, records: Path | None) -> None:
        self._records: dict[tuple[str, str], _Candidates] = {}  # by (file name, weights)
        self._groups: dict[int, _Candidates] = {}  # by each seed a group curve covers
        self.files_read = 0
        if records is None or not records.is_dir():
            return
        for path in sorted(p for p in records.glob("*/seed*.json") if _SEED_FILE.fullmatch(p.name)):
            rec = self._read(path)
            key = (path.name, rec.get("weights", "student"))
            self._records.setdefault(key, []).append((recorded_identity(rec.get("config")), rec))
        for path in sorted(records.glob("*/curve_group.json")):
            rec = self._read(path)
            identity = recorded_identity(rec.get("config"))
            for seed in dict.fromkeys(rec["seeds"]):
                self._groups.setdefault(seed, []).append((identity, rec))

    def _read(self, path: Path) -> dict[str, Any]:
        self.files_read += 1
        return json.loads(path.read_text())

    @staticmethod
    def _first(candidates: _Candidates, arm: Arm) -> dict[str, Any] | None:
        mine = run_identity(arm.config) if candidates else None
        return next((rec for theirs, rec in candidates if theirs is not None and theirs == mine), None)

    def record(self, arm: Arm) -> dict[str, Any] | None:
        """The record of this arm's config, seed and weights, whichever variant directory holds it."""
        return self._first(self._records.get((f"seed{arm.seed}.json", arm.variant.weights), []), arm)

    def group_curve(self, arm: Arm) -> dict[str, Any] | None:
        """A group curve of this arm's config that covers its seed."""
        if arm.variant.train_as is not None:
            return None
        return self._first(self._groups.get(arm.seed, []), arm)
