"""`sdt-sweep`: train named variants x seeds from one YAML, evaluate each, aggregate into tables.

Sweep YAML (see launchers/configs/sweeps/paper.yaml):
  base: launchers/configs/repro_cpu.yaml    training config every arm starts from
  out_dir: runs/sweeps/paper                arms go to <out_dir>/<variant>/seed<k>/
  seeds: [1, 2, 3]
  nproc: 2                                  training processes per arm
  launcher: "{python} -m torch.distributed.run --standalone --nproc_per_node {nproc}"   (optional)
  set: [key=value, ...]                     overrides for every arm (optional)
  eval: {data: ["[NAME=]PATH[@SPLIT]", ...], prune: [1, 2, 3], prune_data: NAME, max_tokens: N}
  variants:
    - {name: gpt_baseline, label: GPT baseline, set: [distill.lambda_kd=0, ...]}
    - {name: ema_only, label: EMA-only, train_as: gpt_baseline, weights: teacher}
  tables:
    - {name: table1, title: ..., rows: [gpt_baseline, ...], columns: [{label: ..., metric: datasets.owt.ppl}],
       pruning_plot: false}

An arm (variant, seed) trains in <out_dir>/<variant or its train_as>/seed<k> (train.out_dir, train.seed
set by the sweep) and is evaluated into <out_dir>/<variant>/seed<k>/eval/. It is finished when the final
checkpoint (step max_steps, export inside) and an eval.json covering the sweep's eval exist; a rerun skips
finished arms, evaluates trained ones, and relaunches the rest (the trainer resumes from its latest
checkpoint). A final checkpoint made from another config than the arm's is refused, not reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdt_dist.atomic import write_json_atomic, write_text_atomic
from sdt_dist.config import Config, ConfigError, load_config
from sdt_dist.paths import expand_vars

DEFAULT_LAUNCHER = "{python} -m torch.distributed.run --standalone --nproc_per_node {nproc}"
TRAIN_SCRIPT = str(Path(__file__).resolve().parents[2] / "launchers" / "pretrain_owt.py")
# Left by an in-process torch.distributed init (evaluation); a launcher must set its own.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    train_as: str | None = None  # reuse this variant's training runs (e.g. evaluate its EMA weights)
    weights: str = "student"


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: list[str]  # variant names
    columns: list[dict[str, str]]  # {label, metric (dotted path into eval.json)}
    labels: dict[str, str] = field(default_factory=dict)  # row labels other than the variants' own
    pruning_plot: bool = False
    note: str = ""


@dataclass
class SweepSpec:
    path: Path
    base: str
    out_dir: Path
    seeds: list[int]
    variants: dict[str, Variant]
    tables: list[Table]
    eval: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    launcher: str = DEFAULT_LAUNCHER
    train_script: str = TRAIN_SCRIPT


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return expand_vars(value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def load_spec(path: str | Path) -> SweepSpec:
    """Parse and check a sweep YAML (every arm's config is validated before anything runs)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    known = {"base", "out_dir", "seeds", "variants", "tables", "eval", "set", "nproc", "launcher", "train_script"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]} (valid: {', '.join(sorted(known))})")
    for key in ("base", "out_dir", "seeds", "variants", "eval"):
        if key not in raw:
            raise ConfigError(f"{path}: missing sweep key {key}")
    variants: dict[str, Variant] = {}
    for v in raw["variants"]:
        if v["name"] in variants:
            raise ConfigError(f"{path}: variant {v['name']} defined twice")
        variants[v["name"]] = Variant(v["name"], v.get("label", v["name"]), [str(o) for o in _expand(v.get("set", []))],
                                      v.get("train_as"), v.get("weights", "student"))
    for v in variants.values():
        if v.train_as is not None and (v.train_as not in variants or variants[v.train_as].train_as is not None):
            raise ConfigError(f"{path}: variant {v.name}: train_as must name a variant that trains itself")
        if v.train_as is not None and v.overrides:
            raise ConfigError(f"{path}: variant {v.name} has train_as, so it cannot have its own overrides")
        if v.weights not in ("student", "teacher"):
            raise ConfigError(f"{path}: variant {v.name}: weights must be student or teacher")
    tables = []
    for t in raw.get("tables", []):
        # a row is a variant name, or {variant, label} to show a shared arm under another name
        rows = [r if isinstance(r, str) else r["variant"] for r in t["rows"]]
        labels = {r["variant"]: r["label"] for r in t["rows"] if not isinstance(r, str)}
        tables.append(Table(t["name"], t.get("title", t["name"]), rows, t["columns"], labels,
                            t.get("pruning_plot", False), t.get("note", "")))
    for t in tables:
        missing = [r for r in t.rows if r not in variants]
        if missing:
            raise ConfigError(f"{path}: table {t.name} names unknown variant {missing[0]}")
    ev = dict(raw["eval"])
    ev["data"] = _expand(ev.get("data", []))
    if not ev["data"]:
        raise ConfigError(f"{path}: eval.data names no dataset")
    spec = SweepSpec(path=path, base=_expand(raw["base"]), out_dir=Path(_expand(raw["out_dir"])),
                     seeds=[int(s) for s in raw["seeds"]], variants=variants, tables=tables, eval=ev,
                     overrides=[str(o) for o in _expand(raw.get("set", []))], nproc=int(raw.get("nproc", 1)),
                     launcher=raw.get("launcher", DEFAULT_LAUNCHER), train_script=raw.get("train_script", TRAIN_SCRIPT))
    return spec


def _same_run(recorded: dict[str, Any] | None, cfg: Config) -> bool:
    """The recorded config is this arm's but for where it ran (a run moved to the variant that names it now,
    e.g. the sweep arm chosen as the new default recipe)."""
    if recorded is None:
        return False
    mine = cfg.to_dict()
    theirs = json.loads(json.dumps(recorded))
    mine["train"].pop("out_dir"), theirs.get("train", {}).pop("out_dir", None)
    return theirs == json.loads(json.dumps(mine))


@dataclass(frozen=True)
class Arm:
    variant: Variant
    seed: int
    train_dir: Path
    eval_dir: Path
    overrides: list[str]  # every --set of its training run
    config: Config

    @property
    def name(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"

    @property
    def final_checkpoint(self) -> Path:
        return self.train_dir / "checkpoints" / f"step_{self.config.train.max_steps:08d}"

    @property
    def eval_json(self) -> Path:
        return self.eval_dir / "eval.json"

    def trained(self) -> bool:
        """The final checkpoint exists (complete: meta.json is written last) and was made by this config."""
        meta_path = self.final_checkpoint / "meta.json"
        if not meta_path.is_file() or not (self.final_checkpoint / "export" / "student.safetensors").is_file():
            return False
        meta = json.loads(meta_path.read_text())
        if meta.get("config_sha256") != self.config.sha256() and not _same_run(meta.get("config"), self.config):
            raise ConfigError(f"{self.final_checkpoint} was trained with another config than arm {self.name} "
                              f"(the sweep YAML or base config changed?); delete {self.train_dir} or use another "
                              f"out_dir")
        return True

    def evaluated(self, ev: dict[str, Any]) -> bool:
        """eval.json exists, is newer than the final checkpoint (a retrained run is evaluated again), is for
        these weights, and covers the requested datasets and pruning (a grown eval section re-evaluates,
        without retraining). Call only when `trained()`."""
        meta = self.final_checkpoint / "meta.json"
        if not self.eval_json.is_file() or self.eval_json.stat().st_mtime_ns < meta.stat().st_mtime_ns:
            return False
        report = json.loads(self.eval_json.read_text())
        from sdt_dist.eval.evaluate import parse_data_arg

        names = {parse_data_arg(d)[0] for d in ev["data"]}
        return (report.get("step") == self.config.train.max_steps and report.get("weights") == self.variant.weights
                and names <= set(report["datasets"]) and set(ev.get("prune", [])) <= set(report["pruning"]["removed"]))


def arms(spec: SweepSpec, variants: list[str] | None = None, seeds: list[int] | None = None) -> list[Arm]:
    """The arms to run: variants that train, then those evaluating another's runs (train_as), each in YAML
    order; a train_as variant's training arm comes along."""
    wanted = list(spec.variants) if variants is None else variants
    needed = {spec.variants[v].train_as for v in wanted if spec.variants[v].train_as} | set(wanted)
    base_cfg = load_config(spec.base, spec.overrides)  # fail early on a bad base
    data_fixed = ["data.source=null"] if base_cfg.data.source is not None else []
    out = []
    for name, v in sorted(spec.variants.items(), key=lambda item: item[1].train_as is not None):
        if name not in needed:
            continue
        trainer = spec.variants[v.train_as] if v.train_as else v
        for seed in seeds or spec.seeds:
            train_dir = spec.out_dir / trainer.name / f"seed{seed}"
            overrides = [*spec.overrides, *trainer.overrides, *data_fixed, f"train.seed={seed}",
                         f"train.out_dir={train_dir}"]
            try:
                cfg = load_config(spec.base, overrides)
            except ConfigError as e:
                raise ConfigError(f"variant {name}: {e}") from None
            out.append(Arm(v, seed, train_dir, spec.out_dir / name / f"seed{seed}" / "eval", overrides, cfg))
    return out


def prepare_data(spec: SweepSpec) -> None:
    """Prepare the base config's corpus once, before any arm: arms then train with data.source unset, so
    the train/valid split is fixed by the base config's seed, not by each arm's train.seed."""
    cfg = load_config(spec.base, spec.overrides)
    d = cfg.data
    if d.source is None:
        return
    from sdt_dist.data.prepare import prepare_corpus

    prepare_corpus(d.source, d.prepared[0], tokenizer_model=d.tokenizer, vocab_size=d.tokenizer_vocab_size,
                   workers=d.workers, text_field=d.text_field, valid_fraction=d.valid_fraction, seed=cfg.train.seed)


def launch_training(spec: SweepSpec, arm: Arm) -> None:
    """Run (or resume) an arm's training as a subprocess; its output goes to <train_dir>/train.log."""
    launcher = [t.format(python=sys.executable, nproc=spec.nproc) for t in shlex.split(spec.launcher)]
    cmd = [*launcher, spec.train_script, "--config", spec.base]
    for o in arm.overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    arm.train_dir.mkdir(parents=True, exist_ok=True)
    with open(arm.train_dir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not arm.trained():
        raise RuntimeError(f"training of {arm.name} exited {rc}; see {arm.train_dir / 'train.log'}")


def evaluate_arm(spec: SweepSpec, arm: Arm) -> None:
    """Evaluate an arm's final checkpoint in this process (TP = 1) and write its report."""
    from sdt_dist.eval.evaluate import evaluate_checkpoint
    from sdt_dist.eval.report import write_report
    from sdt_dist.parallel.dims import init_parallel

    init_parallel(1, 1, 0)
    ev = spec.eval
    report = evaluate_checkpoint(arm.final_checkpoint, ev["data"], weights=arm.variant.weights,
                                 prune=ev.get("prune", []), prune_data=ev.get("prune_data"),
                                 batch_size=ev.get("batch_size", 8), max_tokens=ev.get("max_tokens"))
    report["sweep"] = {"variant": arm.variant.name, "label": arm.variant.label, "seed": arm.seed,
                       "overrides": arm.overrides}
    write_report(report, arm.eval_dir)


Step = Callable[[SweepSpec, Arm], None]


def run(spec: SweepSpec, selected: list[Arm], train: Step = launch_training, evaluate: Step = evaluate_arm,
        log: Callable[[str], None] = print) -> list[str]:
    """Train and evaluate the arms that are not finished; returns the names of the arms that failed
    (the others go on: a long sweep should not stop for one bad arm)."""
    failed = []
    start = time.monotonic()
    for i, arm in enumerate(selected, start=1):
        # progress: which arm of how many, and the sweep's elapsed time (a training's own log has its ETA)
        name = f"({i}/{len(selected)}, {(time.monotonic() - start) / 60:.0f} min) {arm.name}"
        try:
            if arm.trained() and arm.evaluated(spec.eval):
                log(f"[sdt-sweep] {name}: finished, skipped")
                continue
            if not arm.trained():
                if arm.variant.train_as:  # its training arm ran (or failed) before it
                    raise RuntimeError(f"no final checkpoint in {arm.train_dir} (arm {arm.variant.train_as})")
                log(f"[sdt-sweep] {name}: training in {arm.train_dir} (log: {arm.train_dir / 'train.log'})")
                train(spec, arm)
            log(f"[sdt-sweep] {name}: evaluating into {arm.eval_dir}")
            evaluate(spec, arm)
        except (RuntimeError, ConfigError, OSError, ValueError) as e:
            log(f"[sdt-sweep] {name}: FAILED: {e}")
            failed.append(arm.name)
    return failed


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


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="sdt-sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML (launchers/configs/sweeps/)")
    p.add_argument("--tables", type=_csv, help="only the variants of these tables (comma-separated names)")
    p.add_argument("--variants", type=_csv, help="only these variants (comma-separated)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], help="only these seeds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training override for every arm (part of each arm's config)")
    p.add_argument("--out-dir", type=Path, help="override the YAML's out_dir")
    p.add_argument("--dry-run", action="store_true", help="list the arms and their state, run nothing")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild tables from existing eval.json files")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        spec = load_spec(args.sweep)
        spec.overrides += args.overrides
        if args.out_dir is not None:
            spec.out_dir = args.out_dir
        wanted = args.variants
        if args.tables:
            unknown = [t for t in args.tables if t not in {t.name for t in spec.tables}]
            if unknown:
                raise ConfigError(f"unknown table {unknown[0]}")
            wanted = list(dict.fromkeys(r for t in spec.tables if t.name in args.tables for r in t.rows))
        unknown = [v for v in wanted or [] if v not in spec.variants]
        if unknown:
            raise ConfigError(f"unknown variant {unknown[0]}")
        selected = arms(spec, wanted, args.seeds)
    except (ConfigError, KeyError, OSError) as e:
        print(f"[sdt-sweep] error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.dry_run:
        for arm in selected:
            if arm.trained():
                state = "finished" if arm.evaluated(spec.eval) else "to evaluate"
            else:
                state = f"after {arm.variant.train_as}" if arm.variant.train_as else "to train"
            print(f"{arm.name:40s} {state:10s} {arm.train_dir}  --set " + " --set ".join(arm.overrides))
        return
    failed = []
    if not args.aggregate_only:
        prepare_data(spec)
        failed = run(spec, selected)
    for path in write_outputs(spec):
        print(f"[sdt-sweep] wrote {path}")
    if failed:
        print(f"[sdt-sweep] {len(failed)} arm(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
