"""Throughput of SelfDistil-T training by parallel layout, measured side by side in one run.

    python benchmarks/layouts.py [--steps 30] [--config launchers/configs/tiny.yaml] [--only TP=2 ...]

Each layout trains the same model on the same prepared data for `--steps` steps through the real
launcher (torchrun, CPU here); tokens/s and time per step are the medians over the steps after the
first five (start-up, first JIT/allocation), and the ratio is against the single-rank run.
Figures depend on the machine: on 2 CPU cores several ranks compete for the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {
    "1 rank, ZeRO-1": (1, []),
    "DP=2, ZeRO-1": (2, ["parallel.zero_stage=1"]),
    "DP=2, ZeRO-1, teacher gathered per step": (2, ["parallel.zero_stage=1", "distill.teacher_gather=step"]),
    "DP=2, ZeRO-2": (2, ["parallel.zero_stage=2"]),
    "DP=2, ZeRO-3": (2, ["parallel.zero_stage=3"]),
    "TP=2": (2, ["parallel.tensor=2"]),
    "PP=2": (2, ["parallel.pipeline=2"]),
    "TP=2, SP": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
}


def run(name: str, nproc: int, overrides: list[str], args: argparse.Namespace, root: Path) -> dict[str, float]:
    out = root / name.replace(" ", "_").replace(",", "").replace("=", "")
    sets = [f"train.out_dir={out}", f"train.max_steps={args.steps}", f"train.save_interval={10**6}",
            f"train.eval_interval={10**6}", "logging.log_interval=1", "logging.tensorboard=false",
            f"parallel.ds_config=ds_configs/zero{next((o[-1] for o in overrides if 'zero_stage' in o), '1')}.json",
            *args.set, *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "launchers/pretrain_owt.py", "--config", args.config]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["step"] > 5] or records
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "step_time_s": statistics.median(r["step_time_s"] for r in steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--config", default="launchers/configs/tiny.yaml")
    parser.add_argument("--set", action="append", default=[], help="extra config override for every layout")
    parser.add_argument("--only", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS),
                        help="layouts to run (the single-rank baseline always runs)")
    args = parser.parse_args()
    chosen = {name: LAYOUTS[name] for name in LAYOUTS if name == "1 rank, ZeRO-1" or name in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run(name, nproc, ov, args, Path(tmp)) for name, (nproc, ov) in chosen.items()}
    base = results["1 rank, ZeRO-1"]["tokens_per_s"]
    width = max(16, *(len(name) for name in results))
    print(f"{'layout':<{width}} {'tokens/s':>10} {'s/step':>8} {'vs 1 rank':>10}")
    for name, r in results.items():
        print(f"{name:<{width}} {r['tokens_per_s']:>10.0f} {r['step_time_s']:>8.3f} {r['tokens_per_s'] / base:>10.2f}")


if __name__ == "__main__":
    main()
