"""Documents of a byte range of an uncompressed ``.jsonl`` or ``.txt`` file, read the way the ``datasets``
loaders read the whole file (``sdt_dist/data/sources.py``): text mode with universal newlines, invalid
UTF-8 marked; JSON lines one record per non-blank line; text lines without their line break; paragraphs
split on ``"\\n\\n"`` with empty pieces dropped. Ranges are cut at boundaries (``slices.plan_slices``), so
the documents of consecutive ranges are those of the whole file, in order."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from sdt_dist.data.errors import DataError
from sdt_dist.data.sources import _MARK_ERRORS

_BLOCK = 8 << 20  # bytes read at a time: bounded memory whatever the range


def _decode(raw: bytes) -> str:
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors=_MARK_ERRORS).read()


def _blocks(path: str, start: int, end: int) -> Iterator[str]:
    """The range's text in blocks cut just after a ``\\n`` byte: never inside a UTF-8 character or a
    ``\\r\\n`` pair, so decoding block by block is decoding the whole range."""
    with open(path, "rb") as f:
        f.seek(start)
        left, pending = end - start, b""
        while left > 0:
            raw = f.read(min(_BLOCK, left))
            if not raw:
                raise DataError(f"{path}: shorter than when the build was planned ({end} bytes)")
            left -= len(raw)
            data = pending + raw
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            pending = data[cut:]
            if cut:
                yield _decode(data[:cut])


def read_range(
    path: str, start: int, end: int, unit: str, field: str, batch_size: int = 512, skip: int = 0
) -> Iterator[list[str]]:
    """Yield the range's documents in batches, after skipping the first ``skip`` (read, not returned)."""
    seen, carry = 0, ""
    for block in _with_end(_blocks(path, start, end)):
        if unit == "jsonl":
            docs = []
            for line in (block or "").split("\n"):
                if not line.strip():
                    continue
                if seen == 0 and start == 0 and not docs and line.startswith("\ufeff"):
                    line = line[1:]  # the datasets json loader drops a leading byte-order mark
                docs.append(_text(line, path, start, seen + len(docs), field))
        elif unit == "line":
            docs = (block or "").split("\n")
            if docs[-1] == "":
                docs.pop()
        elif block is None:  # paragraphs: the text after the last separator
            docs = [carry] if carry else []
        else:
            pieces = (carry + block).split("\n\n")
            carry = pieces.pop()
            docs = [d for d in pieces if d]
        for i in range(0, len(docs), batch_size):
            batch = docs[i : i + batch_size]
            if skip >= len(batch):
                skip -= len(batch)
            else:
                yield batch[skip:]
                skip = 0
        seen += len(docs)


def _with_end(blocks: Iterator[str]) -> Iterator[str | None]:
    yield from blocks
    yield None


def _text(line: str, path: str, start: int, record: int, field: str) -> str:
    origin = f"{path} (slice at byte {start})" if start else path
    try:
        value = json.loads(line)
    except ValueError as e:
        raise DataError(f"{origin}: record {record} (0-based): not a JSON record ({e})") from None
    if not isinstance(value, dict):
        raise DataError(f"{origin}: record {record} (0-based): not a JSON object")
    if field not in value:
        raise DataError(f"{origin}: records have no field {field!r} (fields: {sorted(value)}); pass the right "
                        "--text-field")
    text = value[field]
    if type(text) is not str:
        what = "is missing" if text is None else f"is a {type(text).__name__}, not text"
        raise DataError(f"{origin}: record {record} (0-based): field {field!r} {what}")
    return text
