"""Train the SentencePiece BPE tokenizer on a sample of a corpus.

    python data_prep/train_tokenizer.py --input SRC --vocab-size 50000 --out DIR

writes DIR/tokenizer.model and the card DIR/sdt_tokenizer.json (vocab size, special ids, sample size, sha256).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _cli import add_input_args, corpus_spec  # also puts the repository on sys.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=50000, help="number of pieces (default: 50000)")
    parser.add_argument(
        "--sample-mb", type=float, default=256.0,
        help="train on the first this many MB of text of the input (default: 256)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="sentencepiece training threads (default: all cores)"
    )
    args = parser.parse_args(argv)

    from sdt_dist.data.errors import DataError
    from sdt_dist.data.tokenizer import CARD_NAME, load_tokenizer, train_tokenizer

    started = time.perf_counter()
    try:
        model = train_tokenizer(
            corpus_spec(args), args.out, vocab_size=args.vocab_size, sample_mb=args.sample_mb, threads=args.workers,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(model)
    print(
        f"{model}: vocab {tok.vocab_size}, eod {tok.eod}, pad {tok.pad}, sha256 {tok.sha256[:16]}...; "
        f"card {model.with_name(CARD_NAME)}; {time.perf_counter() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
