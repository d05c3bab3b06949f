"""A sweep's results: tables (mean ± std over seeds) from the arms' eval.json, pruning plots and learning
curves from their metrics.jsonl (or, where a run directory is gone, from the arm's record), written under the
sweep's out_dir."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

from sdt_dist.atomic import write_json_atomic, write_text_atomic
from sdt_dist.config import ConfigError, load_config
from sdt_dist.eval.sweep_records import RecordIndex, curve_of, write_record
from sdt_dist.eval.sweep_spec import Arm, SweepSpec, arms


def metric(report: dict[str, Any], path: str) -> float | None:
    """A dotted path into an eval report (dict keys; e.g. pruning.increase_pct.2); None when absent."""
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    fmt = ".3e" if abs(mean) >= 1e5 else (".4f" if abs(mean) < 10 else ".2f")
    return f"{mean:{fmt}}" if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def _row_variants(spec: SweepSpec) -> list[str]:
    # each variant once, however many tables show it: its results are read once
    return list(dict.fromkeys(name for table in spec.tables for name in table.rows))


def arms_by_variant(spec: SweepSpec) -> dict[str, list[Arm]]:
    """Each variant's own arms (without the training arm a train_as variant brings along), from one `arms` call:
    every arm's config is loaded once per aggregation."""
    out: dict[str, list[Arm]] = {name: [] for name in spec.variants}
    for arm in arms(spec):
        out[arm.variant.name].append(arm)
    return out


def arm_reports(variant_arms: list[Arm], index: RecordIndex) -> list[tuple[Arm, dict[str, Any] | None]]:
    """Per seed of a variant: the arm and its eval report, from its run directory or else from its record
    (sweep_records.py)."""
    out = []
    for arm in variant_arms:
        if arm.eval_json.is_file():
            report = json.loads(arm.eval_json.read_text())
        else:
            rec = index.record(arm)
            report = None if rec is None else rec["eval"]
        out.append((arm, report))
    return out


def arm_curves(variant_arms: list[Arm], index: RecordIndex) -> list[tuple[Arm, list[list[float]]]]:
    """Per seed of a variant: the arm and its learning curve, from its run's metrics.jsonl or else from its
    record."""
    out = []
    for arm in variant_arms:
        curve = curve_of(arm)
        if not curve and arm.variant.train_as is None:
            rec = index.record(arm)
            curve = [] if rec is None else rec["curve"]
        out.append((arm, curve))
    return out


def aggregate(spec: SweepSpec, index: RecordIndex | None = None,
              by_variant: dict[str, list[Arm]] | None = None) -> dict[str, Any]:
    """Per table and variant: each column's values over the evaluated seeds, mean and std (index: the
    spec's records, by_variant: `arms_by_variant(spec)`, each worked out here when not given)."""
    index = RecordIndex(spec.records) if index is None else index
    by_variant = arms_by_variant(spec) if by_variant is None else by_variant
    reports_of = {name: [(arm.seed, r) for arm, r in arm_reports(by_variant[name], index) if r is not None]
                  for name in _row_variants(spec)}
    result: dict[str, Any] = {"sweep": str(spec.path), "seeds": spec.seeds, "tables": {}}
    for table in spec.tables:
        rows = {}
        for name in table.rows:
            reports = reports_of[name]
            cols = {}
            for col in table.columns:
                values = [v for _, r in reports if (v := metric(r, col["metric"])) is not None]
                mean, std = mean_std(values) if values else (None, None)
                cols[col["label"]] = {"metric": col["metric"], "values": values, "mean": mean, "std": std}
            rows[name] = {"label": table.labels.get(name, spec.variants[name].label),
                          "seeds": [s for s, _ in reports], "columns": cols,
                          "pruning": [r["pruning"] for _, r in reports]}
        result["tables"][table.name] = {"title": table.title, "note": table.note, "rows": rows}
    return result


def markdown_tables(spec: SweepSpec, agg: dict[str, Any]) -> str:
    out = []
    for table in spec.tables:
        t = agg["tables"][table.name]
        out += [f"## {t['title']}", ""]
        if t["note"]:
            out += [t["note"], ""]
        labels = [c["label"] for c in table.columns]
        out += ["| variant | seeds | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
        for row in t["rows"].values():
            cells = [_cell(row["columns"][label]["values"]) for label in labels]
            out.append(f"| {row['label']} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
        out.append("")
    out.append("Cells: mean ± sample standard deviation over seeds (the seeds column counts them).")
    return "\n".join(out) + "\n"


def pruning_plots(spec: SweepSpec, agg: dict[str, Any]) -> list[Path]:
    """Mean pruning curves (± std over seeds) per variant, for tables with pruning_plot."""
    from sdt_dist.eval.report import pruning_plot

    paths = []
    num_layers = spec.base_config().model.num_layers
    for table in spec.tables:
        if not table.pruning_plot:
            continue
        curves = {}
        for row in agg["tables"][table.name]["rows"].values():
            if not row["pruning"]:
                continue
            ks = row["pruning"][0]["removed"]
            stats = [mean_std([p["increase_pct"][str(k)] for p in row["pruning"]]) for k in ks]
            curves[row["label"]] = (ks, [m for m, _ in stats], [s or 0.0 for _, s in stats])
            dataset = row["pruning"][0]["dataset"]
        if curves:
            path = spec.out_dir / f"{table.name}_pruning.png"
            pruning_plot(curves, num_layers, f"{table.title}: pruning degradation on {dataset}", path)
            paths.append(path)
    return paths


def _curve_stats(variant_arms: list[Arm], index: RecordIndex) -> dict[int, list[float]]:
    """Per evaluation step: [seeds, sum, sum of squares] of the validation perplexity over the variant's
    seeds; a group curve (mean and std only) counts for its seeds when none of them has its own curve."""
    stats: dict[int, list[float]] = {}

    def add(step: int, n: float, total: float, squares: float) -> None:
        acc = stats.setdefault(int(step), [0.0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + n, acc[1] + total, acc[2] + squares

    without = []
    for arm, curve in arm_curves(variant_arms, index):
        for step, ppl in curve:
            add(step, 1, ppl, ppl * ppl)
        if not curve:
            without.append(arm)
    used: list[list[int]] = []
    for arm in without:
        group = index.group_curve(arm)
        if group is None or group["seeds"] in used or not set(group["seeds"]) <= {a.seed for a in without}:
            continue
        used.append(group["seeds"])
        n = len(group["seeds"])
        for step, mean, std in zip(group["steps"], group["ppl_mean"], group["ppl_std"]):
            add(step, n, n * mean, (n - 1) * std * std + n * mean * mean)
    return stats


def learning_curves(spec: SweepSpec, index: RecordIndex | None = None,
                    by_variant: dict[str, list[Arm]] | None = None) -> dict[str, dict[str, Any]]:
    """Per table and trained row: held-out perplexity at the runs' evaluation steps against training tokens,
    mean and std over the seeds that logged that step (rows evaluating another arm's weights are left out:
    their runs log the student's perplexity, not theirs). index and by_variant as for `aggregate`."""
    index = RecordIndex(spec.records) if index is None else index
    by_variant = arms_by_variant(spec) if by_variant is None else by_variant
    stats_of = {name: _curve_stats(by_variant[name], index) for name in _row_variants(spec)
                if spec.variants[name].train_as is None}
    cfg = load_config(spec.base, spec.overrides)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    out: dict[str, dict[str, Any]] = {}
    for table in spec.tables:
        rows = {}
        for name in table.rows:
            if spec.variants[name].train_as is not None:
                continue
            stats = stats_of[name]
            if not stats:
                continue
            steps = sorted(stats)
            mean = [stats[s][1] / stats[s][0] for s in steps]
            std = [math.sqrt(max(0.0, (stats[s][2] - stats[s][1] ** 2 / stats[s][0]) / (stats[s][0] - 1)))
                   if stats[s][0] > 1 else 0.0 for s in steps]
            rows[name] = {"label": table.labels.get(name, spec.variants[name].label),
                          "tokens": [s * tokens_per_step for s in steps], "seeds": [int(stats[s][0]) for s in steps],
                          "ppl_mean": mean, "ppl_std": std}
        out[table.name] = rows
    return out


def learning_curve_plots(spec: SweepSpec, curves: dict[str, dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for table in spec.tables:
        rows = curves.get(table.name) or {}
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for row in rows.values():
            ax.errorbar(row["tokens"], row["ppl_mean"], yerr=row["ppl_std"], marker="o", ms=3, capsize=2,
                        label=row["label"])
        ax.set(xlabel="training tokens", ylabel="held-out perplexity (validation split)", yscale="log",
               title=textwrap.fill(f"{table.title}: learning curves", 90))  # long titles wrap, not clip
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = spec.out_dir / f"{table.name}_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def keep_records(spec: SweepSpec, all_arms: list[Arm]) -> list[Path]:
    """Write (or refresh) the record of every arm evaluated in the run directories (sweep_records.py)."""
    if spec.records is None:
        return []
    paths = []
    for arm in all_arms:
        try:
            if arm.trained() and arm.evaluated(spec.eval):
                paths.append(write_record(spec, arm, json.loads(arm.eval_json.read_text())))
        except ConfigError:  # trained by another config: not this arm's result
            continue
    return paths


def write_outputs(spec: SweepSpec) -> list[Path]:
    """tables.json, tables.md, pruning plots and learning curves under out_dir (every table; missing arms
    show as —)."""
    by_variant = arms_by_variant(spec)
    keep_records(spec, [arm for variant_arms in by_variant.values() for arm in variant_arms])
    index = RecordIndex(spec.records)  # after keep_records: it reads what that wrote
    agg = aggregate(spec, index, by_variant)
    agg["learning_curves"] = learning_curves(spec, index, by_variant)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.out_dir / "tables.json", agg)
    write_text_atomic(spec.out_dir / "tables.md", markdown_tables(spec, agg))
    return [spec.out_dir / "tables.json", spec.out_dir / "tables.md", *pruning_plots(spec, agg),
            *learning_curve_plots(spec, agg["learning_curves"])]
