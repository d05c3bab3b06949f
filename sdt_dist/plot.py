"""`sdt-plot RUN [RUN...]`: training curves of one or several runs, from their metrics.jsonl, as one PNG.

Panels share the step axis: the loss terms, held-out perplexity, learning rate, tokens/s and frozen layers;
each run keeps one colour in every panel. A resumed run rewrites the steps after its checkpoint: the last
record of each step is the one plotted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from sdt_dist.metrics import read_metrics

# (metrics.jsonl key, panel title, logarithmic y axis when the values span more than 10x)
PANELS = [("loss", "total loss", False), ("loss_lm", "LM loss", False), ("loss_kd", "KD loss", False),
          ("loss_align", "alignment loss", False), ("val_ppl", "held-out perplexity", True),
          ("lr", "learning rate", False), ("tokens_per_s", "tokens/s", False),
          ("frozen_layers", "frozen layers", False)]


def load_run(run: str | Path) -> dict[int, dict]:
    """{step: last record of that step} from a run directory or a metrics.jsonl file."""
    records = read_metrics(run)
    if not records:
        raise FileNotFoundError(f"{run}: no metrics.jsonl records (give a run directory, e.g. runs/tiny)")
    return {int(r["step"]): r for r in records}


def _series(records: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    points = [(s, float(r[key])) for s, r in sorted(records.items())
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    data = {str(r): load_run(r) for r in runs}
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True)
    for ax, (key, title, log_y) in zip(axes.flat, PANELS):
        shown: list[float] = []
        for i, (name, records) in enumerate(data.items()):
            steps, values = _series(records, key)
            shown += values
            if steps:
                ax.plot(steps, values, color=f"C{i}", label=name, marker="o" if key == "val_ppl" else None,
                        markersize=3, drawstyle="steps-post" if key == "frozen_layers" else "default")
        ax.set_title(title)
        if log_y and shown and min(shown) > 0 and max(shown) / min(shown) > 10:  # early perplexity dwarfs the rest
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers, not 1.1 x 10^3
            ax.yaxis.set_minor_formatter(NullFormatter())
        if key == "frozen_layers":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or metrics.jsonl files)")
    parser.add_argument("--out", help="PNG to write (default: RUN/curves.png for one run, curves.png for several)")
    args = parser.parse_args(argv)
    first = Path(args.runs[0])
    default = (first if first.is_dir() else first.parent) / "curves.png" if len(args.runs) == 1 else "curves.png"
    try:
        path = plot_runs(args.runs, args.out or default)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"[sdt-plot] error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"[sdt-plot] wrote {path}")


if __name__ == "__main__":
    main()
