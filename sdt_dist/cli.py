"""Command-line entry point of training (`launchers/pretrain_owt.py`, `sdt-train`)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from sdt_dist.checkpoint.layout import check_resume_layout
from sdt_dist.config import ConfigError, check_layout, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="SelfDistil-T pretraining on DeepSpeed + megatron-core")
    parser.add_argument("--config", required=True, help="YAML config (see launchers/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set distill.ema_tau=0.999 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train_main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.train.init_from is not None:  # the source's architecture, before any worker starts
            from sdt_dist.init_from import check_compatible

            check_compatible(cfg.train.init_from, cfg.model)
        from sdt_dist.parallel.dims import launcher_world_size

        world = launcher_world_size()
        if world is not None:  # the layout is checked before any process group exists
            check_layout(cfg, world)
        if not args.print_config:  # no launcher: init_distributed starts a one-process world
            check_resume_layout(cfg, world or 1)
    except ConfigError as e:
        print(f"[sdt-dist] config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return

    import torch.distributed as dist

    from sdt_dist.data.errors import DataError
    from sdt_dist.parallel.dims import destroy_parallel, init_parallel
    from sdt_dist.run_lock import RunDirLocked
    from sdt_dist.trainer import Trainer, log0

    dims = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage)
    log0("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None))
    log0(f"parallel layout: {dims.describe()}")
    try:
        Trainer(cfg, dims).fit()
    except (ConfigError, DataError, FileNotFoundError, ValueError, RunDirLocked) as e:
        # bad input: one clear line on every rank, not a traceback from inside a library
        print(f"[sdt-dist] rank {dims.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(2)
    except SystemExit as e:
        # The trainer's SIGTERM/SIGUSR1 stop (checkpoint written) exits 0 from inside fit: take the same
        # clean shutdown as a finished run, so a Slurm requeue is not failed by the exit-time abort below.
        if e.code not in (0, None):
            raise
    except RuntimeError:
        # When a rank dies, every rank waiting for it in a collective fails at once (a gloo/NCCL error). The
        # launcher names the first non-zero exit it polls (deepspeed's: once a second), so such a secondary
        # failure must not reach it first, or the log blames this rank's connection error instead of the
        # death (-9: OOM killer, kill) that caused it. Linger past one poll, then fail as before.
        if dims.world_size > 1:
            time.sleep(3)
        raise
    destroy_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    # Exit without running C++ static destructors: DeepSpeed's CPU comm op sometimes aborts there
    # after all work is done, turning a finished run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    train_main()
