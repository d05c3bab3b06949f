"""One split's Megatron-format shards, written in order under temporary names and renamed once complete; each
finished shard leaves a record (its document range and files' sha256) for a resumed build to trust."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data.indexed_writer import IndexedWriter
from sdt_dist.data.manifest import files_sha256


class ShardWriter:
    """Writes one split's shards in order, at most one (under a temporary name) open at a time; ``prefix``
    (a slice's) goes before the names."""

    def __init__(
        self,
        out: Path,
        split: str,
        index: int,
        start_doc: int,
        dtype: type[np.integer],
        docs_per_shard: int | None,
        shard_bytes: int | None,
        records_dir: Path,
        prefix: str = "",
    ) -> None:
        self.out, self.split, self.dtype, self.prefix = out, split, dtype, prefix
        self.docs_per_shard, self.shard_bytes, self.records_dir = docs_per_shard, shard_bytes, records_dir
        self.itemsize = np.dtype(dtype).itemsize
        self._reset(index, start_doc)

    def _reset(self, index: int, start_doc: int) -> None:
        self.index, self.start_doc = index, start_doc
        self.docs = self.tokens = self.skipped_empty = self.invalid_utf8 = 0
        self.last_doc = start_doc - 1
        self._builder: IndexedWriter | None = None

    @property
    def name(self) -> str:
        return f"{self.prefix}{self.split}-{self.index:05d}"

    def _tmp(self, ext: str) -> Path:
        return self.out / f"{self.name}.tmp.{ext}"

    def skip_empty(self, invalid_utf8: bool) -> None:
        # Counted in the shard whose document range the empty document falls in.
        self.skipped_empty += 1
        self.invalid_utf8 += invalid_utf8

    def add(self, tokens: np.ndarray, doc: int, invalid_utf8: bool) -> dict[str, Any] | None:
        """Append one document; returns the shard's record when this document completed it."""
        if self._builder is None:
            self._builder = IndexedWriter(str(self._tmp("bin")), self.dtype)
        # One sequence per document (never empty: empty documents were skipped upstream).
        self._builder.add_document(tokens)
        self.docs += 1
        self.tokens += len(tokens)
        self.invalid_utf8 += invalid_utf8
        self.last_doc = doc
        full_docs = self.docs_per_shard is not None and self.docs >= self.docs_per_shard
        full_bytes = self.shard_bytes is not None and self.tokens * self.itemsize >= self.shard_bytes
        return self.close() if full_docs or full_bytes else None

    def close(self) -> dict[str, Any]:
        tmp_bin, tmp_idx = self._tmp("bin"), self._tmp("idx")
        assert self._builder is not None, "close() of a shard without documents"
        self._builder.finalize(str(tmp_idx))
        # No fsync needed: a resume re-checks the sha256 of every recorded shard before keeping it.
        shas = files_sha256([tmp_bin, tmp_idx])
        files = {}
        for tmp, sha in zip((tmp_bin, tmp_idx), shas, strict=True):
            final = self.out / f"{self.name}.{tmp.suffix[1:]}"
            files[final.name] = {"bytes": tmp.stat().st_size, "sha256": sha}
            os.replace(tmp, final)
        record = {
            "name": self.name,
            "split": self.split,
            "index": self.index,
            "first_doc": self.start_doc,
            "end_doc": self.last_doc + 1,
            "docs": self.docs,
            "tokens": self.tokens,
            "skipped_empty": self.skipped_empty,
            "invalid_utf8_replaced": self.invalid_utf8,
            "files": files,
        }
        write_json_atomic(self.records_dir / f"{self.name}.json", record, sort_keys=True)
        self._reset(self.index + 1, self.last_doc + 1)
        return record
