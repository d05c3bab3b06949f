"""Parallel, resumable tokenization of a corpus into Megatron-format indexed shards plus ``manifest.json``.

A prepared directory holds::

    manifest.json                     what was built from what, with every file's size and sha256
    tokenizer/tokenizer.model         the tokenizer the shards were made with (copied in)
    train-00000.bin / .idx, ...       megatron-core IndexedDataset shards: one sequence per document,
    valid-00000.bin / .idx, ...       each document's tokens followed by EOD
    _progress/                        only while a build is unfinished: what resuming needs

Determinism: document ``i`` (0-based, in input order) belongs to the validation split iff a seeded hash
of ``i`` falls below ``valid_fraction``. A split's shards take its documents in input order and close at
``docs_per_shard`` documents or ``shard_size_mb`` MB of tokens. None of this depends on the number of
workers or on interruptions, so a resumed build ends with the same files and manifest as a clean one.

Resume: a shard is written under a temporary name, renamed once complete, then recorded in
``_progress/shards/``. On restart recorded shards are checked (size and sha256) and kept, anything else
is deleted, and the input is read again, without re-tokenizing, up to the first unfinished shard.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data._encode import EncodedChunk
from sdt_dist.data.build_resume import check_same_build, diff, keep_finished, read_files_log
from sdt_dist.data.encoder_pool import EncoderPool, chunks
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    check_files,
    manifest_checksum,
    manifest_files,
    read_manifest,
)
from sdt_dist.data.read_progress import ReadProgress
from sdt_dist.data.shard_writer import ShardWriter
from sdt_dist.data.sources import Corpus, CorpusSpec, iter_documents, resolve_corpus
from sdt_dist.data.tokenizer import CARD_NAME, MODEL_NAME, Tokenizer, card_path, load_tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")
PROGRESS_DIR = "_progress"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_MB = 256.0
# Text handed to a worker at a time: ~50 ms of encoding, large enough to make the per-task IPC
# negligible, small enough to keep all workers busy until the end of a small input.
_CHUNK_CHARS = 1 << 18
_SHARD_FILE = re.compile(r"^(train|valid)-\d{5}(\.tmp)?\.(bin|idx)$")
# megatron-core's DType.optimal_dtype threshold: uint16 ids below it, int32 from it on.
_UINT16_VOCAB_LIMIT = 65500


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def assign_valid(doc_indices: np.ndarray, seed: int, valid_fraction: float) -> np.ndarray:
    """True for the documents (by 0-based input index) that belong to the validation split.

    A seeded hash of the index alone decides, so the split never depends on chunking, workers or resume.
    """
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    z = _splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < valid_fraction


@dataclass
class BuildReport:
    """What a build_shards call did; ``manifest`` is the directory's (deterministic) manifest."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float
    docs_processed: int  # documents read and tokenized by this call
    tokens_processed: int
    resumed_at_doc: int | None  # None for a fresh build
    already_complete: bool

    def summary(self) -> str:
        m, inp = self.manifest, self.manifest["input"]
        parts = [
            f"{self.out_dir}: {inp['docs']:,} documents ({inp['skipped_empty']:,} empty skipped, "
            f"{inp['invalid_utf8_replaced']:,} with invalid UTF-8 replaced)"
        ]
        for name, split in m["splits"].items():
            shards = len(split["shards"])
            parts.append(
                f"{name} {split['docs']:,} docs / {split['tokens']:,} tokens in {shards} shard{'s' * (shards != 1)}"
            )
        if self.already_complete:
            return "; ".join(parts) + "; already complete and verified, nothing to do"
        rate = max(self.seconds, 1e-9)
        run = (
            f"tokenized {self.docs_processed:,} docs in {self.seconds:.1f}s: "
            f"{self.docs_processed / rate:,.0f} docs/s, {self.tokens_processed / rate:,.0f} tokens/s"
        )
        if self.resumed_at_doc is not None:
            run += f" (resumed at document {self.resumed_at_doc:,})"
        return "; ".join(parts) + "; " + run


def _copy_tokenizer(tok: Tokenizer, out: Path) -> Path:
    """Put the tokenizer inside the prepared directory so that it is self-contained."""
    tok_dir = out / TOKENIZER_DIR
    tok_dir.mkdir(exist_ok=True)
    target = tok_dir / MODEL_NAME
    if target.resolve() != tok.path.resolve():
        # an old card (`tokenizer.json`) is copied in under the current name
        for src, dst in ((tok.path, target), (card_path(tok.path.parent), tok_dir / CARD_NAME)):
            if src is not None:
                shutil.copyfile(src, dst.with_name(dst.name + ".tmp"))
                os.replace(dst.with_name(dst.name + ".tmp"), dst)
    return target


def build_shards(
    corpus: CorpusSpec | str | list[str],
    out_dir: str | Path,
    tokenizer_model: str | Path,
    *,
    workers: int = 1,
    valid_fraction: float = 0.05,
    seed: int = 1234,
    docs_per_shard: int | None = None,
    shard_size_mb: float | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> BuildReport:
    """Tokenize ``corpus`` (a CorpusSpec, or a bare source read with its defaults) into shards under
    ``out_dir``; resumes an interrupted build, and returns at once when the directory already holds this
    build, verified.

    ``tokenizer_model``: a ``.model`` file, a directory holding ``tokenizer.model``, or a prepared
    directory. Shards close at ``docs_per_shard`` documents, else at ``shard_size_mb`` MB (default 256).
    ``workers`` tokenizing processes (0: tokenize in this process). ``command`` is recorded in the
    manifest (default: ``sys.argv``).
    """
    if workers < 0:
        raise DataError(f"workers must be >= 0, not {workers}")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), not {valid_fraction}")
    if docs_per_shard is not None and shard_size_mb is not None:
        raise DataError("give docs_per_shard or shard_size_mb, not both")
    if docs_per_shard is None and shard_size_mb is None:
        shard_size_mb = DEFAULT_SHARD_MB
    if (docs_per_shard is not None and docs_per_shard < 1) or (shard_size_mb is not None and shard_size_mb <= 0):
        raise DataError("docs_per_shard and shard_size_mb must be positive")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = CorpusSpec.of(corpus)
    resolved = resolve_corpus(spec)
    tok = load_tokenizer(tokenizer_model)
    dtype: type[np.integer] = np.uint16 if tok.vocab_size < _UINT16_VOCAB_LIMIT else np.int32
    settings = {**spec.settings(), "valid_fraction": valid_fraction, "seed": seed, "docs_per_shard": docs_per_shard,
                "shard_size_mb": shard_size_mb}

    records: dict[str, dict[str, Any]] = {}
    file_docs: dict[int, int] = {}
    manifest_path = out / MANIFEST_NAME
    if manifest_path.exists():
        try:
            old = read_manifest(out)
        except DataError as e:  # nothing in it can be trusted: rebuild everything
            logger.warning("%s; rebuilding", e)
        else:
            check_same_build(old, manifest_path, settings, tok, resolved)
            try:
                check_files(out, manifest_files(old), quick=False)
                return BuildReport(out, old, time.perf_counter() - started, 0, 0, None, True)
            except DataError as e:
                logger.warning("%s; rebuilding what is damaged", e)
            records = {r["name"]: r for split in old["splits"].values() for r in split["shards"]}
            file_docs = {i: f["docs"] for i, f in enumerate(old["input"]["files"])}
        manifest_path.unlink()

    progress_dir = out / PROGRESS_DIR
    records_dir = progress_dir / "shards"
    records_dir.mkdir(parents=True, exist_ok=True)
    lock = open(progress_dir / "lock", "w")  # held for the whole build: one writer per directory
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataError(f"{out}: another build is writing this directory") from None
    try:
        state = {"settings": settings, "tokenizer_sha256": tok.sha256, "input": resolved.describe()}
        state_path = progress_dir / "state.json"
        if state_path.exists():
            previous = json.loads(state_path.read_text(encoding="utf-8"))
            if previous != state:
                raise DataError(
                    f"{out}: holds an unfinished build with other settings, tokenizer or input "
                    f"({diff(previous, state)}); resume it with the original arguments or use another --out"
                )
        else:
            write_json_atomic(state_path, state, sort_keys=True)
        for path in records_dir.glob("*.json"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:  # cut short by a crash: that shard is simply rebuilt
                continue
            records[record["name"]] = record
        return _build(
            resolved, out, tok, dtype, settings, records, file_docs, progress_dir, workers, progress,
            command if command is not None else list(sys.argv), started,
        )
    finally:
        lock.close()


def _build(
    corpus: Corpus,
    out: Path,
    tok: Tokenizer,
    dtype: type[np.integer],
    settings: dict[str, Any],
    records: dict[str, dict[str, Any]],
    file_docs: dict[int, int],
    progress_dir: Path,
    workers: int,
    progress: bool,
    command: list[str],
    started: float,
) -> BuildReport:
    records_dir = progress_dir / "shards"
    kept = keep_finished(out, records, SPLITS)
    kept_names = {r["name"] for r in kept}
    # Whatever is not a kept shard goes: partial temporaries, shards renamed but not yet recorded,
    # shards after a damaged one. Only our own file names are touched.
    for path in out.iterdir():
        if _SHARD_FILE.match(path.name) and path.name.split(".")[0] not in kept_names:
            path.unlink()
    for path in records_dir.iterdir():
        if path.suffix != ".json" or path.stem not in kept_names:
            path.unlink()
    for record in kept:
        if not (records_dir / f"{record['name']}.json").exists():
            write_json_atomic(records_dir / f"{record['name']}.json", record, sort_keys=True)
    tokenizer_copy = _copy_tokenizer(tok, out)

    writers = {}
    for split in SPLITS:
        done = [r for r in kept if r["split"] == split]
        writers[split] = ShardWriter(
            out, split, len(done), done[-1]["end_doc"] if done else 0, dtype, settings["docs_per_shard"],
            None if settings["shard_size_mb"] is None else int(settings["shard_size_mb"] * 2**20), records_dir,
        )
    resume_train, resume_valid = writers["train"].start_doc, writers["valid"].start_doc
    start = min(resume_train, resume_valid)

    files_log = progress_dir / "files.jsonl"
    file_docs = {**file_docs, **read_files_log(files_log)}
    file_counts: dict[int, int] = {}
    new_records: list[dict[str, Any]] = []
    with open(files_log, "a", encoding="utf-8") as log:

        def file_done(index: int, count: int) -> None:
            file_counts[index] = count
            if index not in file_docs:  # lets a later resume skip the whole file unopened
                log.write(json.dumps({"file": index, "docs": count}) + "\n")
                log.flush()

        batches = iter_documents(corpus, start=start, file_docs=file_docs, on_file_done=file_done)
        encoder = EncoderPool(workers, tok.path, dtype)
        # percent of the input's bytes read (local files), else a count of documents (a hub dataset)
        reading = ReadProgress(corpus)
        bar = tqdm(desc="tokenizing", total=reading.total, unit="B" if reading.total else " docs",
                   unit_scale=bool(reading.total), disable=not progress, dynamic_ncols=True)
        pending: deque[tuple[np.ndarray, np.ndarray, Future[EncodedChunk]]] = deque()
        docs_done = tokens_done = 0
        run_started = time.perf_counter()

        def consume(idx: np.ndarray, valid: np.ndarray, future: Future[EncodedChunk]) -> None:
            nonlocal docs_done, tokens_done
            chunk = future.result()
            bounds = np.concatenate(([0], np.cumsum(chunk.lengths)))
            k = 0
            for j in range(len(idx)):
                writer = writers["valid" if valid[j] else "train"]
                if chunk.empty[j]:
                    writer.skip_empty(bool(chunk.invalid_utf8[j]))
                    continue
                record = writer.add(chunk.tokens[bounds[k] : bounds[k + 1]], int(idx[j]), bool(chunk.invalid_utf8[j]))
                k += 1
                if record is not None:
                    new_records.append(record)
            docs_done += len(idx)
            tokens_done += len(chunk.tokens)
            bar.update(len(idx) if reading.total is None else reading.bytes_read(file_counts) - bar.n)
            bar.set_postfix_str(f"{docs_done:,} docs, {tokens_done / (time.perf_counter() - run_started):,.0f} "
                                f"tokens/s", refresh=False)

        doc = start
        try:
            for texts in chunks(batches, _CHUNK_CHARS):
                idx = np.arange(doc, doc + len(texts), dtype=np.int64)
                doc += len(texts)
                valid = assign_valid(idx, settings["seed"], settings["valid_fraction"])
                todo = idx >= np.where(valid, resume_valid, resume_train)  # not in a kept shard yet
                if not todo.all():
                    texts = [t for t, keep in zip(texts, todo) if keep]
                    idx, valid = idx[todo], valid[todo]
                if texts:
                    pending.append((idx, valid, encoder.submit(texts)))
                # Bounded read-ahead: keeps every worker busy without pulling the corpus into memory.
                while len(pending) > 4 * max(workers, 1):
                    consume(*pending.popleft())
            while pending:
                consume(*pending.popleft())
        finally:
            encoder.close()
            bar.close()
    for writer in writers.values():
        if writer.docs:
            new_records.append(writer.close())

    if sum(file_counts.values()) != doc:
        raise DataError(f"input changed while it was read: per-file counts {file_counts} vs {doc} documents")
    all_records = kept + new_records
    splits = {}
    for split in SPLITS:
        shards = sorted((r for r in all_records if r["split"] == split), key=lambda r: r["index"])
        tail = writers[split]  # counts of empty documents after the split's last shard
        splits[split] = {
            "docs": sum(r["docs"] for r in shards),
            "tokens": sum(r["tokens"] for r in shards),
            "skipped_empty": sum(r["skipped_empty"] for r in shards) + tail.skipped_empty,
            "invalid_utf8_replaced": sum(r["invalid_utf8_replaced"] for r in shards) + tail.invalid_utf8,
            "shards": shards,
        }
    described = corpus.describe()
    manifest = {
        "format": MANIFEST_FORMAT,
        "command": command,
        "tokenizer": {
            "model": str(tokenizer_copy.relative_to(out)),
            "bytes": tokenizer_copy.stat().st_size,
            "sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "eod": tok.eod,
            "pad": tok.pad,
            "source": str(tok.path),
        },
        "dtype": np.dtype(dtype).name,
        "settings": settings,
        "input": {
            "files": [
                {"path": d.get("path", f"hf:{d.get('hub')}"), "bytes": d.get("bytes"), "docs": file_counts[i]}
                for i, d in enumerate(described)
            ],
            "docs": doc,
            "skipped_empty": sum(s["skipped_empty"] for s in splits.values()),
            "invalid_utf8_replaced": sum(s["invalid_utf8_replaced"] for s in splits.values()),
        },
        "splits": splits,
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    write_json_atomic(out / MANIFEST_NAME, manifest, sort_keys=True)
    shutil.rmtree(progress_dir)
    return BuildReport(
        out, manifest, time.perf_counter() - started, docs_done, tokens_done,
        start if kept else None, False,
    )
