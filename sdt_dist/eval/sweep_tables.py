"""A sweep's results: tables (mean ± std over seeds) from the arms' eval.json, pruning plots and learning
curves from their metrics.jsonl, written under the sweep's out_dir."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sdt_dist.atomic import write_json_atomic, write_text_atomic
from sdt_dist.config import load_config
from sdt_dist.eval.sweep_spec import SweepSpec


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


def aggregate(spec: SweepSpec) -> dict[str, Any]:
    """Per table and variant: each column's values over the evaluated seeds, mean and std."""
    result: dict[str, Any] = {"sweep": str(spec.path), "seeds": spec.seeds, "tables": {}}
    for table in spec.tables:
        rows = {}
        for name in table.rows:
            reports = []
            for seed in spec.seeds:
                path = spec.out_dir / name / f"seed{seed}" / "eval" / "eval.json"
                if path.is_file():
                    reports.append((seed, json.loads(path.read_text())))
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
    num_layers = load_config(spec.base, spec.overrides).model.num_layers
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


def learning_curves(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Per table and trained row: held-out perplexity at the runs' evaluation steps against training tokens,
    mean and std over the seeds that logged that step (rows evaluating another arm's weights are left out:
    their runs log the student's perplexity, not theirs)."""
    from sdt_dist.eval.compute import read_metrics

    cfg = load_config(spec.base, spec.overrides)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    out: dict[str, dict[str, Any]] = {}
    for table in spec.tables:
        rows = {}
        for name in table.rows:
            if spec.variants[name].train_as is not None:
                continue
            by_step: dict[int, list[float]] = {}
            for seed in spec.seeds:
                for r in read_metrics(spec.out_dir / name / f"seed{seed}"):
                    if r.get("val_ppl") is not None:
                        by_step.setdefault(r["step"], []).append(r["val_ppl"])
            if by_step:
                steps = sorted(by_step)
                stats = [mean_std(by_step[s]) for s in steps]
                rows[name] = {"label": table.labels.get(name, spec.variants[name].label),
                              "tokens": [s * tokens_per_step for s in steps], "seeds": [len(by_step[s]) for s in steps],
                              "ppl_mean": [m for m, _ in stats], "ppl_std": [sd or 0.0 for _, sd in stats]}
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
               title=f"{table.title}: learning curves")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = spec.out_dir / f"{table.name}_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(spec: SweepSpec) -> list[Path]:
    """tables.json, tables.md, pruning plots and learning curves under out_dir (every table; missing arms
    show as —)."""
    agg = aggregate(spec)
    agg["learning_curves"] = learning_curves(spec)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(spec.out_dir / "tables.json", agg)
    write_text_atomic(spec.out_dir / "tables.md", markdown_tables(spec, agg))
    return [spec.out_dir / "tables.json", spec.out_dir / "tables.md", *pruning_plots(spec, agg),
            *learning_curve_plots(spec, agg["learning_curves"])]
