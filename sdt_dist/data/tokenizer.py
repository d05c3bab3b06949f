"""SentencePiece BPE tokenizer: training on a corpus sample, loading, and the vocab check against a model.

The trained model keeps text exactly (identity normalisation, no dummy prefix, no whitespace folding,
byte fallback for characters outside the vocabulary), so decode(encode(text)) == text except for the
character U+2581, which sentencepiece uses internally as its space marker. Special ids: 0 <unk> (unused
with byte fallback), 1 <|endoftext|> (end of document, EOD), 2 <pad>; "\\n" is a piece of its own.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import MANIFEST_NAME, file_sha256, read_manifest
from sdt_dist.data.sources import INVALID_UTF8_MARK, CorpusSpec, iter_documents, resolve_corpus

MODEL_NAME = "tokenizer.model"
# Not `tokenizer.json`: Hugging Face reserves that name for its fast-tokenizer file, and AutoTokenizer fails on
# any other JSON found under it. Directories prepared before the rename carry the card under the old name.
CARD_NAME = "sdt_tokenizer.json"
LEGACY_CARD_NAME = "tokenizer.json"
CARD_FORMAT = "sdt-dist-tokenizer/1"
EOD_PIECE = "<|endoftext|>"
# 256 byte pieces + 3 specials + "\n" must fit, with room for real merges.
MIN_VOCAB = 300


class Tokenizer:
    """A loaded SentencePiece model with what the trainer and megatron-core's GPTDataset need."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: tokenizer model not found")
        self.sha256 = file_sha256(self.path)
        self._load()

    def _load(self) -> None:
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size: int = self._sp.vocab_size()
        self.eod: int = self._sp.eos_id()
        if self.eod < 0:
            raise DataError(f"{self.path}: the tokenizer has no end-of-document (eos) piece")
        pad = self._sp.pad_id()
        self.pad: int = pad if pad >= 0 else self.eod
        # megatron-core hashes this into its index-cache names, so caches follow the tokenizer.
        self.unique_identifiers = {"class": "sdt_dist.SentencePieceTokenizer", "sha256": self.sha256}

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.sha256 = state["path"], state["sha256"]
        self._load()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Any) -> str:
        return self._sp.decode(ids.tolist() if isinstance(ids, np.ndarray) else list(ids))

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad})"


def load_tokenizer(prepared_dir_or_model_path: str | Path) -> Tokenizer:
    """Load the tokenizer of a prepared directory (checked against its manifest), a tokenizer directory
    (``tokenizer.model`` inside) or a ``.model`` file."""
    path = Path(prepared_dir_or_model_path)
    if (path / MANIFEST_NAME).is_file():
        entry = read_manifest(path)["tokenizer"]
        tok = Tokenizer(path / entry["model"])
        if tok.sha256 != entry["sha256"]:
            raise DataError(
                f"{tok.path}: sha256 differs from the one {path / MANIFEST_NAME} was built with; the shards "
                "were tokenized by another tokenizer"
            )
        return tok
    if path.is_dir():
        return Tokenizer(path / MODEL_NAME)
    return Tokenizer(path)


def check_vocab(prepared_dir: str | Path, model_vocab_size: int) -> int:
    """Refuse a prepared corpus whose token ids could overflow the model's embedding table.

    Returns the tokenizer's vocabulary size.
    """
    tok = load_tokenizer(prepared_dir)
    if tok.vocab_size > model_vocab_size:
        raise DataError(
            f"{tok.path}: tokenizer vocabulary ({tok.vocab_size}) exceeds the model's vocab_size "
            f"({model_vocab_size}); ids >= {model_vocab_size} would index past the embedding table"
        )
    return tok.vocab_size


def _write_sample(corpus: Any, path: Path, limit_bytes: int, progress: bool) -> dict[str, int]:
    """Write the corpus's first ``limit_bytes`` of text, one non-blank line per line (sentencepiece's
    sentence unit), and return the sample's size."""
    docs = lines = size = 0
    bar = tqdm(desc="tokenizer sample", total=limit_bytes, unit="B", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    with bar, open(path, "w", encoding="utf-8") as f:
        for batch in iter_documents(corpus):
            for doc in batch:
                doc = doc.replace(INVALID_UTF8_MARK, "\ufffd")
                if doc.isspace() or not doc:
                    continue
                docs += 1
                for line in doc.split("\n"):
                    if line.strip():
                        f.write(line + "\n")
                        lines += 1
                        size += len(line.encode("utf-8")) + 1
                bar.update(size - bar.n)
                if size >= limit_bytes:
                    return {"docs": docs, "lines": lines, "bytes": size}
    return {"docs": docs, "lines": lines, "bytes": size}


def train_tokenizer(
    corpus: CorpusSpec | str | list[str],
    out_dir: str | Path,
    *,
    vocab_size: int = 50000,
    sample_mb: float = 256.0,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a BPE model on the first ``sample_mb`` MB of the corpus; write ``out_dir/tokenizer.model``
    and the card ``out_dir/sdt_tokenizer.json``. Returns the model path."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 260 pieces")
    spec = CorpusSpec.of(corpus)
    resolved = resolve_corpus(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample_path = out / ".tokenizer-sample.txt"
    prefix = out / ".tokenizer-training"
    started = time.perf_counter()
    try:
        sample = _write_sample(resolved, sample_path, int(sample_mb * 2**20), progress)
        if sample["docs"] == 0:
            raise DataError(f"{spec.source}: no non-empty documents to train a tokenizer on")
        if progress:  # sentencepiece reports nothing while it trains
            print(f"tokenizer: training BPE (vocab {vocab_size}) on {sample['bytes'] / 2**20:.1f} MB "
                  f"({sample['docs']:,} documents) ...", file=sys.stderr, flush=True)
        spm.SentencePieceTrainer.train(
            input=str(sample_path),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            unk_id=0,
            eos_id=1,
            pad_id=2,
            bos_id=-1,
            eos_piece=EOD_PIECE,
            user_defined_symbols=["\n"],
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        limit = re.search(r"value <= (\d+)", str(e))
        if limit is None:
            raise DataError(f"sentencepiece training failed on {spec.source}: {e}") from None
        raise DataError(
            f"--vocab-size {vocab_size} is too large for the training sample ({sample['docs']} documents, "
            f"{sample['bytes'] / 2**20:.1f} MB of text): sentencepiece can build at most {limit.group(1)} "
            "pieces from it; lower --vocab-size or give more text (--sample-mb, a larger --input)"
        ) from None
    finally:
        sample_path.unlink(missing_ok=True)
        Path(f"{prefix}.vocab").unlink(missing_ok=True)
    model = out / MODEL_NAME
    os.replace(f"{prefix}.model", model)
    tok = Tokenizer(model)
    card = {
        "format": CARD_FORMAT,
        "model": MODEL_NAME,
        "sha256": tok.sha256,
        "vocab_size": tok.vocab_size,
        "special_ids": {"unk": tok._sp.unk_id(), "eod": tok.eod, "pad": tok.pad},
        "special_pieces": {"eod": EOD_PIECE, "pad": tok._sp.id_to_piece(tok.pad), "newline": "\n"},
        "model_type": "bpe",
        "byte_fallback": True,
        "normalization": "identity",
        "training_sample": {**sample, "sample_mb_limit": sample_mb},
        "source": [str(s) for s in ([spec.source] if isinstance(spec.source, str | os.PathLike) else spec.source)],
        "text_field": spec.text_field,
        "training_seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / CARD_NAME, card, sort_keys=True)  # written last: its presence marks a finished tokenizer
    if progress:
        print(f"tokenizer: {model} ({tok.vocab_size} pieces) in {card['training_seconds']} s", file=sys.stderr,
              flush=True)
    return model


def card_path(tokenizer_dir: str | Path) -> Path | None:
    """The tokenizer card in ``tokenizer_dir``: ``sdt_tokenizer.json``, else a ``tokenizer.json`` written by an
    older sdt-dist (recognised by its format field, so a Hugging Face file of that name is never taken for it)."""
    current, legacy = Path(tokenizer_dir) / CARD_NAME, Path(tokenizer_dir) / LEGACY_CARD_NAME
    if current.is_file():
        return current
    if legacy.is_file():
        try:
            if json.loads(legacy.read_text(encoding="utf-8")).get("format") == CARD_FORMAT:
                return legacy
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    return None


def trained_tokenizer_ok(out_dir: str | Path, vocab_size: int) -> bool:
    """Whether ``out_dir`` holds a finished tokenizer of this vocab size (card present and matching)."""
    card, model = card_path(out_dir), Path(out_dir) / MODEL_NAME
    if card is None or not model.is_file():
        return False
    data = json.loads(card.read_text(encoding="utf-8"))
    return data.get("vocab_size") == vocab_size and data.get("sha256") == file_sha256(model)
