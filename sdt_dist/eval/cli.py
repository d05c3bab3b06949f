"""`sdt-eval`: perplexity, ECE, pruning degradation and compute of a checkpoint, as JSON + Markdown + PNG.

  sdt-eval runs/repro/gpt_baseline/seed1 --data owt=runs/data/owt1000-sp4096 \\
      --data wt2_valid=$SDT_SHARED_DATA/wikitext-2/valid.txt --prune 1,2,3 --out runs/eval/baseline
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdt_dist.paths import default_accelerator_env


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sdt-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run dir (latest checkpoint), checkpoints/ dir, step_* dir, or an export dir")
    p.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH[@SPLIT]",
                   help="held-out data: a prepared dir (its valid split unless @SPLIT) or a raw text file; repeatable")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="which exported weights to evaluate (teacher = the EMA weights)")
    p.add_argument("--tokenizer", help="tokenizer for raw text files (default: the first prepared --data, "
                                       "else the run's own)")
    p.add_argument("--prune", type=_int_list, default=[], metavar="K1,K2,...",
                   help="numbers of layers to remove for the pruning curve (0 is always included)")
    p.add_argument("--prune-data", help="dataset NAME for the pruning curve (default: the first --data)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of each dataset (recorded)")
    p.add_argument("--out", type=Path, help="output dir (default: <checkpoint>/eval or <checkpoint>/eval_teacher)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    default_accelerator_env()
    from sdt_dist.data.errors import DataError
    from sdt_dist.eval.evaluate import evaluate_checkpoint, resolve_checkpoint
    from sdt_dist.eval.report import markdown, write_report
    from sdt_dist.parallel.dims import init_parallel

    try:
        ref = resolve_checkpoint(args.checkpoint)
        init_parallel(1, 1, 0)
        report = evaluate_checkpoint(ref.step_dir or ref.export_dir, args.data, weights=args.weights,
                                     tokenizer=args.tokenizer, prune=args.prune, prune_data=args.prune_data,
                                     batch_size=args.batch_size, max_tokens=args.max_tokens)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"[sdt-eval] error: {e}", file=sys.stderr)
        sys.exit(2)
    suffix = "" if args.weights == "student" else f"_{args.weights}"
    out = args.out or (ref.step_dir or ref.export_dir) / f"eval{suffix}"
    paths = write_report(report, out)
    print(markdown(report))
    print(f"[sdt-eval] wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
