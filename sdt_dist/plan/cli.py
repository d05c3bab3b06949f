"""`sdt-plan CONFIG [--set ...] --world N [--nodes M --device a100-80gb|h100-80gb|cpu] [--mfu 0.4]`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from sdt_dist.config import ConfigError, load_config
from sdt_dist.distill.teacher import gathered_per_step
from sdt_dist.plan.devices import DEVICES, device
from sdt_dist.plan.inventory import ParamInfo, parameter_inventory
from sdt_dist.plan.memory import run_layout, run_precision
from sdt_dist.plan.report import Plan, format_plan, make_plan
from sdt_dist.plan.suggest import as_overrides, smallest_fitting_change


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sdt-plan", description="Per-rank memory, FLOPs and step time of a run, "
                                 "computed before launching it (meta-device model, no weights allocated)")
    ap.add_argument("config", help="training YAML (launchers/configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--world", type=int, required=True, help="number of ranks (GPUs)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes the ranks are spread over (TP stays in a node)")
    ap.add_argument("--device", choices=DEVICES, default=None, help="check the fit and estimate step time")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of the device's peak FLOP/s")
    ap.add_argument("--headroom", type=float, default=0.0,
                    help="fraction of usable device memory to keep free (the estimates' margin), e.g. 0.1")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.world < 1 or args.nodes < 1 or args.world % args.nodes:
            raise ConfigError(f"--world {args.world} must be a positive multiple of --nodes {args.nodes}")
        if not 0 <= args.headroom < 1:
            raise ConfigError(f"--headroom must be in [0, 1), got {args.headroom}")
        if not 0 < args.mfu <= 1:
            raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
        cfg = load_config(args.config, args.overrides)
        layout = run_layout(cfg, args.world)
        dev = device(args.device, args.world // args.nodes) if args.device else None
        kind = None if args.device is None else "cpu" if args.device == "cpu" else "cuda"
        precision = run_precision(cfg, layout.dp, kind)
    except ConfigError as e:
        print(f"[sdt-plan] config error: {e}", file=sys.stderr)
        return 2
    inv = parameter_inventory(cfg)
    plan = make_plan(cfg, inv, layout, precision, dev, args.nodes, args.headroom)
    print(format_plan(plan, args.mfu))
    moved = max(s.teacher_all_gather for s in plan.stages)
    if dev is not None and moved and not gathered_per_step(cfg):
        per_step = _with_teacher_gathered_per_step(plan, inv)
        once = max(s.teacher_all_gather for s in per_step.stages)
        if once < moved:  # several micro-batches a step, each gathering the teacher again
            verdict = "fits" if per_step.fits else "does not fit"
            print(f"with --set distill.teacher_gather=step: peak {per_step.peak / 2**30:.1f} GiB ({verdict}), the "
                  f"teacher all-gathered once a step ({once / 2**30:.2f} GiB instead of {moved / 2**30:.2f})")
    if dev is not None and not plan.fits:
        better = smallest_fitting_change(cfg, inv, layout, precision, dev, args.world // args.nodes, args.headroom)
        if better is None:
            print("no layout with more ZeRO, recomputation, TP (within a node), PP or a smaller micro-batch fits: "
                  "more ranks are needed")
        else:
            flags = " ".join(f"--set {o}" for o in as_overrides(layout, better.layout))
            print(f"smallest change that fits: {flags}  (peak {better.peak / 2**30:.1f} GiB; "
                  f"{better.layout.describe()})")
    return 0


def _with_teacher_gathered_per_step(plan: Plan, inv: list[ParamInfo]) -> Plan:
    cfg = dataclasses.replace(plan.cfg, distill=dataclasses.replace(plan.cfg.distill, teacher_gather="step"))
    return make_plan(cfg, inv, plan.layout, plan.precision, plan.device, plan.nodes, plan.headroom)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
