"""Tokenize a corpus (OpenWebText or any text corpus) into Megatron-format shards for training.

    python data_prep/build_owt_shards.py --input SRC --tokenizer MODEL --out DIR --workers N

writes DIR/{train,valid}-NNNNN.{bin,idx} and DIR/manifest.json. Re-running the same command resumes an
interrupted build (kill -9 included) and ends with the same manifest as an uninterrupted run; on a
finished directory it only verifies the checksums.
"""

from __future__ import annotations

import argparse
import os
import sys

from _cli import add_input_args, corpus_spec  # also puts the repository on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument(
        "--tokenizer", required=True, metavar="MODEL",
        help="sentencepiece model (tokenizer.model), or the directory train_tokenizer.py wrote",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(),
        help="tokenizing processes (default: all cores; 0 = tokenize in the main process)",
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
            progress=not args.no_progress, command=list(sys.argv),
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
