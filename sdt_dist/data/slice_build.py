"""One slice of a shard build, from its input bytes to its finished shards: run by a worker process (or by
the main process for the last slice left, with a pool of tokenizers). Resumable: a slice's finished shards
are recorded, and a rerun keeps those that verify and continues after them."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data._encode import EncodedChunk, encode_chunk
from sdt_dist.data.build_resume import keep_finished
from sdt_dist.data.encoder_pool import chunks
from sdt_dist.data.range_reader import read_range
from sdt_dist.data.read_progress import ReadProgress
from sdt_dist.data.shard_writer import ShardWriter
from sdt_dist.data.slices import Slice
from sdt_dist.data.sources import Corpus, iter_documents
from sdt_dist.data.split import assign_valid

SPLITS = ("train", "valid")
# Text tokenized at a time: ~50 ms of encoding, large enough to make the per-task IPC of a tokenizer
# pool negligible, small enough to keep all its workers busy until the end of a small input.
_CHUNK_CHARS = 1 << 18

Submit = Callable[[list[str]], "Future[EncodedChunk]"]


@dataclass(frozen=True)
class SliceTask:
    """Everything a worker needs to build slice number ``index`` of the plan (picklable)."""

    corpus: Corpus
    slice: Slice
    index: int
    progress_dir: Path  # holds shards/ (shards and their records) and slices/ (one summary per finished slice)
    dtype_name: str
    settings: dict[str, Any]

    @property
    def prefix(self) -> str:
        return f"s{self.index:06d}-"

    @property
    def shards_dir(self) -> Path:
        return self.progress_dir / "shards"

    @property
    def summary_path(self) -> Path:
        return summary_path(self.progress_dir, self.index)


def summary_path(progress_dir: Path, index: int) -> Path:
    return progress_dir / "slices" / f"s{index:06d}.json"


@dataclass
class SliceResult:
    summary: dict[str, Any]  # what the slice contributes to the manifest (also in its summary file)
    docs_processed: int  # read and tokenized by this call
    tokens_processed: int
    resumed_at: int | None  # the slice's first unfinished document, when finished shards were kept


def _encode_here(texts: list[str]) -> Future[EncodedChunk]:
    done: Future[EncodedChunk] = Future()
    done.set_result(encode_chunk(texts))
    return done


def _documents(task: SliceTask, start: int) -> Iterator[list[str]]:
    s, corpus = task.slice, task.corpus
    if s.end is not None:
        yield from read_range(corpus.files[s.file], s.start, s.end, s.unit, corpus.text_field, skip=start)
        return
    if corpus.hub_name is None:  # one whole file, through the datasets loaders
        corpus = dataclasses.replace(corpus, files=(corpus.files[s.file],))
    yield from iter_documents(corpus, start=start)


def _load_records(task: SliceTask) -> dict[str, dict[str, Any]]:
    records = {}
    for path in task.shards_dir.glob(f"{task.prefix}*.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # cut short by a crash: that shard is simply rebuilt
            continue
        records[record["name"]] = record
    return records


def build_slice(task: SliceTask, submit: Submit | None = None, progress: bool = False) -> SliceResult:
    """Tokenize the slice into ``progress_dir/shards/s<index>-{train,valid}-NNNNN.{bin,idx}``, resuming after
    its recorded shards; ``submit`` tokenizes a chunk (default: here, with the model init_worker loaded)."""
    submit = submit or _encode_here
    shards_dir, settings = task.shards_dir, task.settings
    shards_dir.mkdir(parents=True, exist_ok=True)
    kept = keep_finished(shards_dir, _load_records(task), SPLITS)
    kept_names = {r["name"] for r in kept}
    # Whatever of this slice is not a kept shard goes: partial temporaries, shards renamed but not yet
    # recorded, shards after a damaged one.
    mine = re.compile(rf"^{task.prefix}(train|valid)-\d{{5}}(\.tmp)?\.(bin|idx|json)$")
    for path in shards_dir.iterdir():
        if mine.match(path.name) and path.name.split(".")[0] not in kept_names:
            path.unlink()
    dtype = np.dtype(task.dtype_name).type
    shard_bytes = None if settings["shard_size_mb"] is None else int(settings["shard_size_mb"] * 2**20)
    writers = {}
    for split in SPLITS:
        done = [r for r in kept if r["split"] == split]
        writers[split] = ShardWriter(shards_dir, split, len(done), done[-1]["end_doc"] if done else 0, dtype,
                                     settings["docs_per_shard"], shard_bytes, shards_dir, prefix=task.prefix)
    resume_train, resume_valid = writers["train"].start_doc, writers["valid"].start_doc
    start = min(resume_train, resume_valid)

    whole_file = task.slice.end is None and task.corpus.hub_name is None
    # percent of the file's bytes read when it is read whole, else a count of documents
    reading = ReadProgress(dataclasses.replace(task.corpus, files=(task.corpus.files[task.slice.file],))) \
        if progress and whole_file else None
    bar = tqdm(desc="tokenizing", total=reading.total if reading else None,
               unit="B" if reading and reading.total else " docs", unit_scale=bool(reading and reading.total),
               disable=not progress, dynamic_ncols=True)
    new_records: list[dict[str, Any]] = []
    pending: deque[tuple[np.ndarray, np.ndarray, Future[EncodedChunk]]] = deque()
    docs_done = tokens_done = 0
    started = time.perf_counter()

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
        if progress:
            bar.update(len(idx) if reading is None else reading.bytes_read(()) - bar.n)
            bar.set_postfix_str(f"{docs_done:,} docs, {tokens_done / (time.perf_counter() - started):,.0f} "
                                "tokens/s", refresh=False)

    doc = start
    try:
        for texts in chunks(_documents(task, start), _CHUNK_CHARS):
            idx = np.arange(doc, doc + len(texts), dtype=np.int64)
            doc += len(texts)
            valid = assign_valid(task.slice.positions(idx), settings["seed"], settings["valid_fraction"])
            todo = idx >= np.where(valid, resume_valid, resume_train)  # not in a kept shard yet
            if not todo.all():
                texts = [t for t, keep in zip(texts, todo) if keep]
                idx, valid = idx[todo], valid[todo]
            if texts:
                pending.append((idx, valid, submit(texts)))
            # Bounded read-ahead: keeps a tokenizer pool busy without pulling the input into memory.
            while len(pending) > 8:
                consume(*pending.popleft())
        while pending:
            consume(*pending.popleft())
    finally:
        bar.close()
    for writer in writers.values():
        if writer.docs:
            new_records.append(writer.close())
    summary = {
        "slice": task.index,
        **task.slice.describe(),
        "path": task.corpus.files[task.slice.file] if task.corpus.hub_name is None else f"hf:{task.corpus.hub_name}",
        "docs": doc,
        "tail": {split: {"skipped_empty": w.skipped_empty, "invalid_utf8_replaced": w.invalid_utf8}
                 for split, w in writers.items()},
        "shards": sorted(kept + new_records, key=lambda r: (r["split"], r["index"])),
    }
    task.summary_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(task.summary_path, summary, sort_keys=True)
    return SliceResult(summary, docs_done, tokens_done, start if kept else None)

