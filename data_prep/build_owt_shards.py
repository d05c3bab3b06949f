"""Tokenize a corpus (OpenWebText or any text corpus) into Megatron-format shards for training.

    python data_prep/build_owt_shards.py --input SRC --tokenizer MODEL --out DIR --workers N

writes DIR/{train,valid}-NNNNN.{bin,idx} and DIR/manifest.json. Re-running the same command resumes an
interrupted build (kill -9 included) and ends with the same manifest as an uninterrupted run; on a
finished directory it only verifies the checksums.

Several machines (e.g. a Slurm array, launchers/slurm/build_shards_array.sbatch): part I of N on each,

    python data_prep/build_owt_shards.py --input SRC --tokenizer MODEL --slice I/N --out PARTS/part_I
    python data_prep/build_owt_shards.py --merge PARTS/part_* --out DIR

gives the same DIR as the one-machine build (the recorded command aside).
"""

from __future__ import annotations

import argparse
import os
import sys

from _cli import add_input_args, corpus_spec  # also puts the repository on sys.path


def merge_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="merge the parts of a --slice I/N build into one directory")
    parser.add_argument("--merge", nargs="+", required=True, metavar="PART", help="the N part directories")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)

    from pathlib import Path

    from sdt_dist.data.assemble import merge_parts
    from sdt_dist.data.errors import DataError

    try:
        manifest = merge_parts([Path(p) for p in args.merge], Path(args.out), list(sys.argv))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{name} {s['docs']:,} docs in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    print(f"{args.out}: {manifest['input']['docs']:,} documents from {len(args.merge)} parts; {splits}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--merge" in argv:
        return merge_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument(
        "--tokenizer", required=True, metavar="MODEL",
        help="sentencepiece model (tokenizer.model), or the directory train_tokenizer.py wrote",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(),
        help="worker processes, each reading and tokenizing whole slices (default: all cores; 0 = all in the "
        "main process)",
    )
    parser.add_argument(
        "--slice-mb", type=float, default=64.0,
        help="MB of input per slice of an uncompressed .jsonl/.txt file: the unit of parallel work (default: 64)",
    )
    parser.add_argument(
        "--slice", default=None, metavar="I/N",
        help="build only part I (1..N) of N of the slices into --out, for --merge (one machine per part)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--docs-per-shard", type=int, default=None, help="documents per shard")
    size.add_argument("--shard-size-mb", type=float, default=None, help="MB of tokens per shard (default: 256)")
    parser.add_argument(
        "--valid-fraction", type=float, default=0.05,
        help="fraction of documents for the validation split, chosen by a seeded hash (default: 0.05)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed of the train/valid assignment (default: 1234)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from sdt_dist.data.errors import DataError
    from sdt_dist.data.shards import build_shards

    try:
        report = build_shards(
            corpus_spec(args), args.out, args.tokenizer, workers=args.workers, valid_fraction=args.valid_fraction,
            seed=args.seed, docs_per_shard=args.docs_per_shard, shard_size_mb=args.shard_size_mb,
            slice_mb=args.slice_mb, part=args.slice, progress=not args.no_progress, command=list(sys.argv),
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
