"""Slices: the units of work of a shard build, planned from the input alone (never from the worker count).

A slice is one input file, or a byte range of an uncompressed ``.jsonl`` or ``.txt`` (line or paragraph
unit) file cut at a document boundary. Compressed files, ``.json``, ``.parquet``, ``--txt-unit document``
and a Hugging Face dataset are one slice each: there is no way to start reading them in the middle.

A document's identity, which alone decides its split, is its *position* ``(file << 40) + slice_start +
index within the slice``: the file's index in the input, the byte where its slice begins, and its 0-based
number inside the slice. Every document takes at least one byte of its slice, so positions never collide;
for the first file of the input read as one slice the position is the 0-based document number, the
identity of format 1.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdt_dist.data.errors import DataError
from sdt_dist.data.sources import Corpus, builder_for

_FILE_SHIFT = 40  # a file may hold up to 1 TiB: byte positions stay below 2**40
_PART = re.compile(r"^(\d+)/(\d+)$")
# A cut is searched for in windows of this many bytes after the nominal position.
_WINDOW = 1 << 16


@dataclass(frozen=True)
class Slice:
    """Documents of ``file`` (index into the corpus) from byte ``start`` to ``end``; ``end`` None: the whole
    file, read by the ``datasets`` library; otherwise read by :mod:`sdt_dist.data.range_reader` as ``unit``."""

    file: int
    start: int = 0
    end: int | None = None
    unit: str = ""  # "jsonl", "line" or "paragraph" for byte ranges

    @property
    def name(self) -> str:
        return f"f{self.file:05d}-b{self.start:013d}"

    def describe(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "end": self.end, "unit": self.unit}

    def positions(self, local: np.ndarray) -> np.ndarray:
        """Document identities of the documents numbered ``local`` (0-based) in this slice."""
        return np.asarray(local, dtype=np.uint64) + np.uint64((self.file << _FILE_SHIFT) + self.start)


def range_unit(path: str, txt_unit: str) -> str | None:
    """How a file can be read by byte ranges, or None when it cannot (compressed, .json, .parquet)."""
    builder = builder_for(path)
    if path.lower().endswith((".gz", ".bz2", ".xz", ".zst")):
        return None
    if builder == "json" and path.lower().endswith(".jsonl"):
        return "jsonl"
    if builder == "text" and txt_unit in ("line", "paragraph"):
        return txt_unit
    return None


def _next_cut(f: Any, pos: int, size: int, unit: str) -> int:
    """First document boundary at or after ``pos``: just after a ``\\n`` (lines, JSON lines), or just after
    the first two bare ``\\n`` of a run of newlines that a non-newline byte precedes (paragraphs: the
    datasets text reader splits the text on ``"\\n\\n"`` from left to right, so a match there is one of its
    separators)."""
    while pos < size:
        back = 1 if unit == "paragraph" and pos > 0 else 0
        f.seek(pos - back)
        window = f.read(_WINDOW + 2)
        if unit == "paragraph":
            m = re.search(rb"[^\r\n]\n\n", window)
            if m:
                return pos - back + m.start() + 3
        else:
            k = window.find(b"\n")
            if k >= 0:
                return pos - back + k + 1
        pos += _WINDOW
    return size


def plan_slices(corpus: Corpus, slice_bytes: int) -> list[Slice]:
    """The input's slices in input order: each splittable file cut about every ``slice_bytes`` bytes."""
    if corpus.hub_name is not None:
        return [Slice(0)]
    if len(corpus.files) >= 1 << (64 - _FILE_SHIFT):
        raise DataError(f"{len(corpus.files)} input files: at most {1 << (64 - _FILE_SHIFT)} are supported")
    plan = []
    for i, path in enumerate(corpus.files):
        unit = range_unit(path, corpus.txt_unit)
        size = os.path.getsize(path)
        if size >= 1 << _FILE_SHIFT:
            raise DataError(f"{path}: {size} bytes; files of up to 1 TiB are supported, split it")
        if unit is None:
            plan.append(Slice(i))
            continue
        start = 0
        with open(path, "rb") as f:
            while start < size:
                end = _next_cut(f, start + slice_bytes, size, unit) if start + slice_bytes < size else size
                plan.append(Slice(i, start, end, unit))
                start = end
        if size == 0:
            plan.append(Slice(i, 0, 0, unit))
    return plan


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) -> (I, N)."""
    m = _PART.match(text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise DataError(f"--slice {text!r}: expected I/N with 1 <= I <= N, e.g. 3/16")
    return int(m.group(1)), int(m.group(2))


def part_of(plan: list[Slice], part: int, parts: int) -> list[int]:
    """Indices into ``plan`` of part ``part`` of ``parts``: contiguous runs of (nearly) equal length."""
    n = len(plan)
    return list(range((part - 1) * n // parts, part * n // parts))
