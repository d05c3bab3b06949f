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
from pathlib import Path
from typing import Any

from sdt_dist.atomic import write_json_atomic
from sdt_dist.eval.sweep_spec import Arm, SweepSpec, same_run


def curve_of(arm: Arm) -> list[list[float]]:
    """[step, validation perplexity] at the run's evaluation steps; empty for an arm that evaluates another
    arm's weights (its run logs the student's perplexity, not its own)."""
    from sdt_dist.eval.compute import read_metrics

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


def _load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(paths)]


def find_record(spec: SweepSpec, arm: Arm) -> dict[str, Any] | None:
    """The record of this arm's config, seed and weights, whichever variant directory holds it."""
    if spec.records is None or not spec.records.is_dir():
        return None
    for rec in _load(list(spec.records.glob(f"*/seed{arm.seed}.json"))):
        if rec.get("weights", "student") == arm.variant.weights and same_run(rec.get("config"), arm.config):
            return rec
    return None


def find_group_curve(spec: SweepSpec, arm: Arm) -> dict[str, Any] | None:
    """A group curve of this arm's config that covers its seed."""
    if spec.records is None or not spec.records.is_dir() or arm.variant.train_as is not None:
        return None
    for rec in _load(list(spec.records.glob("*/curve_group.json"))):
        if arm.seed in rec["seeds"] and same_run(rec.get("config"), arm.config):
            return rec
    return None
