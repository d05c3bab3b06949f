"""Evaluation reports: JSON (machine-readable, the sweep reads it), Markdown, and PNG plots."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters or CI
import matplotlib.pyplot as plt  # noqa: E402

from sdt_dist.atomic import write_json_atomic  # noqa: E402


def reliability_diagram(bins: list[dict[str, Any]], ece: float, title: str, path: Path) -> None:
    """Accuracy per confidence bin against the diagonal, with the tokens per bin below."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = bins[0]["hi"] - bins[0]["lo"]
    filled = [b for b in bins if b["count"]]
    centers = [(b["lo"] + b["hi"]) / 2 for b in filled]
    top.bar(centers, [b["accuracy"] for b in filled], width=width, edgecolor="black", label="accuracy")
    top.bar(centers, [b["confidence"] - b["accuracy"] for b in filled], bottom=[b["accuracy"] for b in filled],
            width=width, color="tab:red", alpha=0.35, edgecolor="tab:red", label="gap to confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}\nECE = {ece:.4f}")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, [b["count"] for b in filled], width=width, edgecolor="black", color="grey")
    bottom.set(xlabel="confidence (max softmax probability)", ylabel="tokens", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pruning_plot(curves: dict[str, tuple[list[int], list[float], list[float] | None]], num_layers: int,
                 title: str, path: Path) -> None:
    """% perplexity increase against layers removed; one line per label, optional error bars (std)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (ks, values, errors) in curves.items():
        ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label=label)
    ax.set(xlabel=f"layers removed (of {num_layers}, evenly spaced kept)", ylabel="perplexity increase (%)",
           title=textwrap.fill(title, 62))  # long titles wrap, not clip
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Evaluation of `{report['checkpoint']}` ({report['weights']} weights, step {report['step']})", ""]
    lines += ["| dataset | tokens scored | NLL | perplexity | top-1 acc | ECE (10 bins) |", "|---|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        lines.append(f"| {name} | {d['tokens_scored']} | {d['nll']:.4f} | {d['ppl']:.2f} | {d['accuracy']:.4f} "
                     f"| {d['ece']:.4f} |")
    p = report["pruning"]
    lines += ["", f"## Pruning degradation ({p['dataset']})", "",
              "| layers removed | removed layer numbers | perplexity | increase (%) |", "|---|---|---|---|"]
    for k in p["removed"]:
        lines.append(f"| {k} | {p['removed_layers'][str(k)] or '-'} | {p['ppl'][str(k)]:.2f} "
                     f"| {p['increase_pct'][str(k)]:.2f} |")
    c = report["compute"]
    lines += ["", "## Compute", "", "| quantity | value |", "|---|---|"]
    rows = [("parameters (total)", c["parameters"]["total"]),
            ("parameters (non-embedding)", c["parameters"]["non_embedding"])]
    if "flops_per_token" in c:
        rows += [("FLOPs/token forward", c["flops_per_token"]["forward"]),
                 ("FLOPs/token training (plain GPT)", c["flops_per_token"]["training"]),
                 ("steps", c["steps"]), ("tokens seen", c["tokens_seen"]),
                 ("training FLOPs (this run's schedule)", c["train_flops"]),
                 ("training FLOPs without freezing", c["train_flops_without_freezing"]),
                 ("freezing compute ratio", c["freezing_compute_ratio"]),
                 ("frozen-layer timeline (first step, layers)", c["frozen_timeline"])]
    if "accelerator_hours" in c:
        rows += [("accelerator-hours", c["accelerator_hours"]), ("world size", c["world_size"])]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in rows]
    lines += ["", "## Protocol", ""] + [f"- **{k}**: {v}" for k, v in report["protocol"].items()]
    if "flops_formula" in c:
        lines.append(f"- **FLOPs**: {c['flops_formula']}")
    if report.get("max_tokens"):
        lines.append(f"- each dataset capped at its first {report['max_tokens']} predicted tokens")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """eval.json, eval.md, reliability_<dataset>.png, pruning.png under `out_dir`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, d in report["datasets"].items():
        paths[f"reliability_{name}"] = out_dir / f"reliability_{name}.png"
        reliability_diagram(d["bins"], d["ece"], f"{name} ({report['weights']})", paths[f"reliability_{name}"])
    p = report["pruning"]
    paths["pruning"] = out_dir / "pruning.png"
    pruning_plot({report["weights"]: (p["removed"], [p["increase_pct"][str(k)] for k in p["removed"]], None)},
                 report["model"]["num_layers"], f"pruning degradation on {p['dataset']}", paths["pruning"])
    paths["markdown"] = out_dir / "eval.md"
    paths["markdown"].write_text(markdown(report))
    paths["json"] = out_dir / "eval.json"
    write_json_atomic(paths["json"], report)  # last: its presence means the report is complete
    return paths
