"""One-call, idempotent corpus preparation for the trainer's built-in data path."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sdt_dist.config import Config
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import MANIFEST_NAME, read_manifest, verify_prepared
from sdt_dist.data.shards import TOKENIZER_DIR, build_shards
from sdt_dist.data.sources import CorpusSpec
from sdt_dist.data.tokenizer import MODEL_NAME, train_tokenizer, trained_tokenizer_ok

logger = logging.getLogger(__name__)


def prepare_corpus(
    corpus: CorpusSpec | str | list[str],
    out_dir: str | Path,
    *,
    tokenizer_model: str | None = None,
    vocab_size: int = 50000,
    workers: int = 1,
    valid_fraction: float = 0.05,
    seed: int = 1234,
    progress: bool = True,
) -> Path:
    """Make ``out_dir`` a verified prepared corpus of ``corpus`` (a CorpusSpec or a bare source) and return it.

    Returns at once when ``out_dir/manifest.json`` exists and every file verifies. Otherwise trains a
    ``vocab_size`` tokenizer into ``out_dir/tokenizer/`` (unless ``tokenizer_model`` is given, or one
    of that size is already there) and builds the shards, resuming whatever an earlier call left.
    Call it on one rank only; the other ranks should wait (barrier) and then read the directory.
    """
    spec = CorpusSpec.of(corpus)
    out = Path(out_dir)
    if (out / MANIFEST_NAME).exists():
        try:
            manifest = read_manifest(out)
        except DataError as e:
            logger.warning("%s; rebuilding", e)
        else:
            if tokenizer_model is None and manifest["tokenizer"]["vocab_size"] != vocab_size:
                raise DataError(
                    f"{out / MANIFEST_NAME}: prepared with a {manifest['tokenizer']['vocab_size']}-piece "
                    f"tokenizer, not {vocab_size}; use another out_dir"
                )
            try:
                verify_prepared(out)
                return out
            except DataError as e:
                logger.warning("%s; repairing", e)
    if tokenizer_model is None:
        tok_dir = out / TOKENIZER_DIR
        if not trained_tokenizer_ok(tok_dir, vocab_size):
            train_tokenizer(spec, tok_dir, vocab_size=vocab_size, threads=workers, progress=progress)
        tokenizer_model = str(tok_dir / MODEL_NAME)
    command = [
        "sdt_dist.data.prepare_corpus",
        f"source={spec.source!r}",
        f"tokenizer_model={tokenizer_model!r}",
        f"vocab_size={vocab_size}",
        f"text_field={spec.text_field!r}",
        f"valid_fraction={valid_fraction}",
        f"seed={seed}",
    ]
    report = build_shards(spec, out, tokenizer_model, workers=workers, valid_fraction=valid_fraction, seed=seed,
                          progress=progress, command=command)
    if progress:
        print(report.summary(), file=sys.stderr)
    return out


def prepare_configured(cfg: Config, progress: bool = True) -> Path:
    """`data.source` of a training config prepared into its first prepared directory, split by the run's seed
    (the trainer's built-in data path, and a sweep's shared corpus)."""
    d = cfg.data
    return prepare_corpus(CorpusSpec(d.source, text_field=d.text_field), d.prepared[0], tokenizer_model=d.tokenizer,
                          vocab_size=d.tokenizer_vocab_size, workers=d.workers, valid_fraction=d.valid_fraction,
                          seed=cfg.train.seed, progress=progress)

