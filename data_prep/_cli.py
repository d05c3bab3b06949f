"""Arguments shared by the data_prep command-line scripts, so that both spell them the same way."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Run as `python data_prep/<script>.py` from a checkout: make the package importable without installing.
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="SRC",
        help="local files, globs or directories (.jsonl, .json, .txt, optionally .gz/.bz2/.xz/.zst; .parquet), "
        "or one Hugging Face dataset name such as Skylion007/openwebtext (streamed)",
    )
    parser.add_argument("--text-field", default="text", help="record field holding the text (default: text)")
    parser.add_argument(
        "--txt-unit", default="paragraph", choices=("paragraph", "line", "document"),
        help="document unit of .txt files: blank-line-separated paragraph (default), line, or whole file",
    )
    parser.add_argument("--hf-config", default=None, help="Hugging Face dataset configuration, e.g. wikitext-2-raw-v1")
    parser.add_argument("--hf-split", default="train", help="Hugging Face dataset split (default: train)")


def corpus_spec(args: argparse.Namespace) -> Any:
    """The input arguments as a CorpusSpec (imported here, after the path setup above)."""
    from sdt_dist.data.sources import CorpusSpec

    return CorpusSpec(args.input, text_field=args.text_field, hf_config=args.hf_config, hf_split=args.hf_split,
                      txt_unit=args.txt_unit)

