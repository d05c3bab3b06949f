"""Parallel, resumable tokenization of a corpus into Megatron-format indexed shards plus ``manifest.json``.

A prepared directory holds::

    manifest.json                     what was built from what, with every file's size and sha256
    tokenizer/tokenizer.model         the tokenizer the shards were made with (copied in)
    train-00000.bin / .idx, ...       megatron-core IndexedDataset shards: one sequence per document,
    valid-00000.bin / .idx, ...       each document's tokens followed by EOD
    _progress/                        only while a build is unfinished: what resuming needs

Work is planned as slices (``slices.py``: files, and byte ranges of uncompressed JSON-lines and text
files); each worker process reads its own slices and writes their shards (``slice_build.py``); the main
process only plans, waits, and assembles the manifest (``assemble.py``). A document's split is a seeded hash
of its identity (file, slice, number in the slice); a slice's shards take its documents in order and close
at ``docs_per_shard`` documents or ``shard_size_mb`` MB of tokens, and the final shards are the slices'
shards in input order. None of this depends on the number of workers, on interruptions, or on building
the input as ``part=(I, N)`` parts on several machines and merging them (``merge_parts``).

Resume: a shard is written under a temporary name, renamed once complete, then recorded in
``_progress/shards/``; a finished slice leaves its summary in ``_progress/slices/``. On restart finished
slices are skipped, and in the others recorded shards are checked (size and sha256) and kept, anything
else is deleted, and the slice is read again, without re-tokenizing, up to its first unfinished shard.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data._encode import init_worker
from sdt_dist.data.assemble import PART_FORMAT, PART_NAME, assemble, part_sources, restore_progress
from sdt_dist.data.build_resume import check_same_build, diff
from sdt_dist.data.encoder_pool import EncoderPool
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, check_files, manifest_files, read_manifest
from sdt_dist.data.slice_build import SPLITS, SliceResult, SliceTask, build_slice, summary_path
from sdt_dist.data.slices import Slice, parse_part, part_of, plan_slices
from sdt_dist.data.sources import Corpus, CorpusSpec, resolve_corpus
from sdt_dist.data.split import assign_valid
from sdt_dist.data.tokenizer import CARD_NAME, MODEL_NAME, Tokenizer, card_path, load_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["SPLITS", "BuildReport", "assign_valid", "build_shards"]

PROGRESS_DIR = "_progress"
TOKENIZER_DIR = "tokenizer"
DEFAULT_SHARD_MB = 256.0
# Input bytes per slice of a splittable file: the unit of parallel work (and a bound on a shard's size).
DEFAULT_SLICE_MB = 64.0
# megatron-core's DType.optimal_dtype threshold: uint16 ids below it, int32 from it on.
_UINT16_VOCAB_LIMIT = 65500


@dataclass
class BuildReport:
    """What a build_shards call did; ``manifest`` is the directory's (deterministic) manifest, or for a
    part the part's description (``part.json``)."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float
    docs_processed: int  # documents read and tokenized by this call
    tokens_processed: int
    resumed_at_doc: int | None  # None for a fresh build; for a part, counted from the part's first document
    already_complete: bool

    def summary(self) -> str:
        if self.manifest.get("format") == PART_FORMAT:
            part, n = self.manifest["part"]
            parts = [f"{self.out_dir}: part {part}/{n}, {len(self.manifest['slices'])} of "
                     f"{len(self.manifest['plan'])} slices, {sum(s['docs'] for s in self.manifest['slices']):,} "
                     "documents"]
        else:
            m, inp = self.manifest, self.manifest["input"]
            parts = [
                f"{self.out_dir}: {inp['docs']:,} documents ({inp['skipped_empty']:,} empty skipped, "
                f"{inp['invalid_utf8_replaced']:,} with invalid UTF-8 replaced)"
            ]
            for name, split in m["splits"].items():
                shards = len(split["shards"])
                parts.append(f"{name} {split['docs']:,} docs / {split['tokens']:,} tokens in {shards} "
                             f"shard{'s' * (shards != 1)}")
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
    slice_mb: float = DEFAULT_SLICE_MB,
    part: str | tuple[int, int] | None = None,
    progress: bool = True,
    command: list[str] | None = None,
) -> BuildReport:
    """Tokenize ``corpus`` (a CorpusSpec, or a bare source read with its defaults) into shards under
    ``out_dir``; resumes an interrupted build, and returns at once when the directory already holds this
    build, verified.

    ``tokenizer_model``: a ``.model`` file, a directory holding ``tokenizer.model``, or a prepared
    directory. Shards close at ``docs_per_shard`` documents, else at ``shard_size_mb`` MB (default 256).
    Splittable files are cut into slices of about ``slice_mb`` MB of input. ``workers`` processes, each
    building whole slices (0: everything in this process). ``part`` (``"I/N"`` or ``(I, N)``, 1 <= I <= N):
    build only the I-th of N parts of the slices into ``out_dir``, to be merged with ``merge_parts``.
    ``command`` is recorded in the manifest (default: ``sys.argv``).
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
    if slice_mb <= 0:
        raise DataError(f"slice_mb must be positive, not {slice_mb}")
    if part is not None:
        part = parse_part(part if isinstance(part, str) else f"{part[0]}/{part[1]}")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = CorpusSpec.of(corpus)
    resolved = resolve_corpus(spec)
    tok = load_tokenizer(tokenizer_model)
    dtype: type[np.integer] = np.uint16 if tok.vocab_size < _UINT16_VOCAB_LIMIT else np.int32
    settings = {**spec.settings(), "valid_fraction": valid_fraction, "seed": seed, "docs_per_shard": docs_per_shard,
                "shard_size_mb": shard_size_mb, "slice_mb": slice_mb}
    progress_dir = out / PROGRESS_DIR
    manifest_path = out / (MANIFEST_NAME if part is None else PART_NAME)
    old = None
    if manifest_path.exists():
        try:
            old = read_manifest(out) if part is None else _read_part(manifest_path)
        except DataError as e:  # nothing in it can be trusted: rebuild everything
            logger.warning("%s; rebuilding", e)
        else:
            done = _finished(old, manifest_path, settings, tok, resolved, out, part)
            if done:
                return BuildReport(out, old, time.perf_counter() - started, 0, 0, None, True)
    plan = plan_slices(resolved, int(slice_mb * 2**20))
    (progress_dir / "shards").mkdir(parents=True, exist_ok=True)
    lock = open(progress_dir / "lock", "w")  # held for the whole build: one writer per directory
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataError(f"{out}: another build is writing this directory") from None
    try:
        state = {"settings": settings, "tokenizer_sha256": tok.sha256, "input": resolved.describe(),
                 "part": None if part is None else list(part)}
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
        if old is not None and part is None:  # a damaged finished directory: repaired like a resumed build
            restore_progress(out, old, progress_dir)
        manifest_path.unlink(missing_ok=True)
        return _build(resolved, plan, part, out, tok, dtype, settings, progress_dir, workers, progress,
                      command if command is not None else list(sys.argv), started)
    finally:
        lock.close()


def _read_part(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if not isinstance(info, dict) or info.get("format") != PART_FORMAT:
        raise DataError(f"{path}: not a part description of format {PART_FORMAT!r}")
    return info


def _finished(
    old: dict[str, Any], path: Path, settings: dict[str, Any], tok: Tokenizer, corpus: Corpus, out: Path,
    part: tuple[int, int] | None,
) -> bool:
    """Whether ``out`` already holds this very build (or part), intact; refuses a different build."""
    if part is None:
        if old["format"] != MANIFEST_FORMAT:
            raise DataError(f"{path}: prepared by an earlier version (format {old['format']!r}); it still loads "
                            "for training, but cannot be resumed or repaired by this one: use another --out")
        check_same_build(old, path, settings, tok, corpus)
        try:
            check_files(out, manifest_files(old), quick=False)
        except DataError as e:
            logger.warning("%s; rebuilding what is damaged", e)
            return False
        shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)  # left if a crash followed the manifest
        return True
    check_same_build(old["head"], path, settings, tok, corpus)
    if old["part"] != list(part):
        raise DataError(f"{path}: holds part {old['part'][0]}/{old['part'][1]}, not {part[0]}/{part[1]}; "
                        "use another --out")
    shards = out / PROGRESS_DIR / "shards"
    entries = [(name, meta["bytes"], meta["sha256"]) for s in old["slices"] for r in s["shards"]
               for name, meta in r["files"].items()]
    try:
        check_files(shards, entries, quick=False)
    except DataError as e:
        logger.warning("%s; rebuilding what is damaged", e)
        for s in old["slices"]:  # every slice rechecks its own shards and rebuilds from a damaged one
            summary_path(out / PROGRESS_DIR, s["slice"]).unlink(missing_ok=True)
        return False
    return True


def _head(
    tok: Tokenizer, tokenizer_copy: Path, out: Path, dtype: type[np.integer], settings: dict[str, Any],
    corpus: Corpus, command: list[str],
) -> dict[str, Any]:
    """The manifest's fields that do not depend on the shards."""
    return {
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
        "input": {"files": [{"path": d.get("path", f"hf:{d.get('hub')}"), "bytes": d.get("bytes")}
                            for d in corpus.describe()]},
    }


def _finished_summary(progress_dir: Path, index: int) -> bool:
    try:
        json.loads(summary_path(progress_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or cut short by a crash: the slice is resumed
        return False
    return True


def _run_slices(tasks: list[SliceTask], workers: int, model: Path, progress: bool) -> list[SliceResult]:
    """Build the slices: one worker process per slice at a time; the last slice left, when it is the only
    one, in this process with ``workers`` tokenizing processes (the only way to give one unsplittable file,
    e.g. a compressed one, more than one core)."""
    if not tasks:
        return []
    dtype_name = tasks[0].dtype_name
    if workers == 0 or len(tasks) == 1:
        encoder = EncoderPool(workers, model, np.dtype(dtype_name).type)
        try:
            return [build_slice(t, encoder.submit, progress) for t in tasks]
        finally:
            encoder.close()
    # spawn, not fork: the parent runs pyarrow and tqdm threads whose locks a fork would copy.
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(str(model), dtype_name, os.getpid()))
    bar = tqdm(desc="slices", total=len(tasks), disable=not progress, dynamic_ncols=True)
    try:
        futures = [pool.submit(build_slice, t) for t in tasks]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            bar.update(len(done))
            for future in done:
                future.result()  # a worker's DataError (bad record, file changed) ends the build here
        return [f.result() for f in futures]
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)


def _build(
    corpus: Corpus,
    plan: list[Slice],
    part: tuple[int, int] | None,
    out: Path,
    tok: Tokenizer,
    dtype: type[np.integer],
    settings: dict[str, Any],
    progress_dir: Path,
    workers: int,
    progress: bool,
    command: list[str],
    started: float,
) -> BuildReport:
    selected = list(range(len(plan))) if part is None else part_of(plan, *part)
    tasks = [SliceTask(corpus, plan[k], k, progress_dir, np.dtype(dtype).name, settings)
             for k in selected if not _finished_summary(progress_dir, k)]
    results = _run_slices(tasks, workers, tok.path, progress)
    tokenizer_copy = _copy_tokenizer(tok, out)
    head = _head(tok, tokenizer_copy, out, dtype, settings, corpus, command)
    sources = part_sources(progress_dir, selected)
    docs = sum(r.docs_processed for r in results)
    tokens = sum(r.tokens_processed for r in results)
    first_offsets = {k: sum(s["docs"] for _, s in sources[: selected.index(k)]) for k in selected}
    resumed = next((first_offsets[t.index] + r.resumed_at for t, r in zip(tasks, results)
                    if r.resumed_at is not None), None)
    seconds = time.perf_counter() - started
    if part is not None:
        info = {"format": PART_FORMAT, "part": list(part), "plan": [s.describe() for s in plan],
                "head": {k: v for k, v in head.items() if k != "command"}, "command": command,
                "slices": [summary for _, summary in sources]}
        write_json_atomic(out / PART_NAME, info, sort_keys=True)
        return BuildReport(out, info, seconds, docs, tokens, resumed, False)
    manifest = assemble(out, sources, head)
    shutil.rmtree(progress_dir)
    return BuildReport(out, manifest, time.perf_counter() - started, docs, tokens, resumed, False)
