"""`sdt-sweep`: train named variants x seeds from one YAML, evaluate each, aggregate into tables.

Sweep YAML (see launchers/configs/sweeps/paper.yaml):
  base: launchers/configs/repro_cpu.yaml    training config every arm starts from
  out_dir: runs/sweeps/paper                arms go to <out_dir>/<variant>/seed<k>/
  seeds: [1, 2, 3]
  nproc: 2                                  training processes per arm
  launcher: "{python} -m torch.distributed.run --standalone --nproc_per_node {nproc} -m sdt_dist.cli"   (optional;
            e.g. "deepspeed --num_accelerators {nproc} --module sdt_dist.cli"; the config flags follow it)
  set: [key=value, ...]                     overrides for every arm (optional)
  records: docs/results/paper_runs          keep each evaluated arm's result here beyond its run directory
                                            (optional; sweep_records.py)
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

The pieces: sweep_spec.py (the YAML, arms), this file (running arms, the CLI), sweep_tables.py (tables, plots),
sweep_records.py (results that outlive run directories).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdt_dist.config import ConfigError
from sdt_dist.eval.sweep_spec import Arm, SweepSpec, arms, load_spec
from sdt_dist.eval.sweep_tables import write_outputs
from sdt_dist.paths import default_accelerator_env

# Left by an in-process torch.distributed init (evaluation); a launcher must set its own.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def prepare_data(spec: SweepSpec) -> None:
    """Prepare the base config's corpus once, before any arm: arms then train with data.source unset, so
    the train/valid split is fixed by the base config's seed, not by each arm's train.seed."""
    cfg = spec.base_config()
    if cfg.data.source is None:
        return
    from sdt_dist.data.prepare import prepare_configured

    prepare_configured(cfg)


def launch_training(spec: SweepSpec, arm: Arm) -> None:
    """Run (or resume) an arm's training as a subprocess; its output goes to <train_dir>/train.log."""
    launcher = [t.format(python=sys.executable, nproc=spec.nproc) for t in shlex.split(spec.launcher)]
    cmd = [*launcher, "--config", spec.base]
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
    default_accelerator_env()
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
