"""Resolve an input (local files or a Hugging Face dataset name) and read its documents in order through
the ``datasets`` library, streaming, so that tens of GB never need to fit in memory or in a cache.

Document units: one record per document for ``.jsonl``/``.json``/``.parquet``; for ``.txt`` one
blank-line-separated paragraph by default (``txt_unit``: ``paragraph``, ``line`` or ``document`` = the
whole file).
"""

from __future__ import annotations

import codecs
import functools
import glob
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sdt_dist.data.errors import DataError

# Invalid UTF-8 is decoded to this noncharacter (Unicode reserves U+FDD0..U+FDEF for internal use, so
# real text does not carry it); the tokenization worker counts the documents holding it and turns it
# into U+FFFD. Plain errors="replace" could not tell a repaired document from one that already contained
# U+FFFD (5 of the first 1000 OpenWebText documents do).
INVALID_UTF8_MARK = "\ufdd0"
_MARK_ERRORS = "sdt_dist_mark_invalid_utf8"


def _mark_invalid_utf8(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return INVALID_UTF8_MARK, err.end


codecs.register_error(_MARK_ERRORS, _mark_invalid_utf8)

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TXT_UNITS = ("paragraph", "line", "document")
# A hub id: "name" or "owner/name", nothing that looks like a file.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class CorpusSpec:
    """What the user named as input, and how to read it (the arguments every data step shares)."""

    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    text_field: str = "text"  # record field holding the text (.jsonl/.json/.parquet, hub datasets)
    hf_config: str | None = None  # hub dataset configuration, e.g. wikitext-2-raw-v1
    hf_split: str = "train"
    txt_unit: str = "paragraph"  # document unit of .txt files: paragraph, line or document

    @classmethod
    def of(cls, corpus: CorpusSpec | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> CorpusSpec:
        """A spec as given, or a bare source read with the defaults."""
        return corpus if isinstance(corpus, CorpusSpec) else cls(corpus)

    def settings(self) -> dict[str, Any]:
        """The reading options, as recorded in manifests (the source is recorded as files)."""
        return {"text_field": self.text_field, "txt_unit": self.txt_unit, "hf_config": self.hf_config,
                "hf_split": self.hf_split}


@dataclass(frozen=True)
class Corpus:
    """A resolved input: either local ``files`` (read in this order) or one hub dataset."""

    files: tuple[str, ...] = ()
    hub_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    txt_unit: str = "paragraph"

    def describe(self) -> list[dict[str, Any]]:
        """Identity of the input, for resume checks: paths, sizes and mtimes (or the hub coordinates)."""
        if self.hub_name is not None:
            return [{"hub": self.hub_name, "config": self.hf_config, "split": self.hf_split}]
        out = []
        for path in self.files:
            st = os.stat(path)
            out.append({"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        return out


def builder_for(path: str) -> str:
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in _BUILDERS:
        raise DataError(
            f"{path}: unsupported input type; use .jsonl, .json, .txt (optionally compressed with "
            f"{', '.join(_COMPRESSIONS)}) or .parquet"
        )
    return _BUILDERS[ext]


def _supported(path: str) -> bool:
    try:
        builder_for(path)
    except DataError:
        return False
    return True


def resolve_corpus(
    corpus: CorpusSpec | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
) -> Corpus:
    """Expand globs and directories into an ordered file list, or recognise a Hugging Face dataset name."""
    spec = CorpusSpec.of(corpus)
    source, txt_unit = spec.source, spec.txt_unit
    if txt_unit not in TXT_UNITS:
        raise DataError(f"txt_unit must be one of {TXT_UNITS}, not {txt_unit!r}")
    sources = [source] if isinstance(source, str | os.PathLike) else list(source)
    if not sources:
        raise DataError("no input given")
    files: list[str] = []
    hub: list[str] = []
    for item in map(os.fspath, sources):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
        elif os.path.isdir(item):
            matches = sorted(
                os.path.join(root, name) for root, _, names in os.walk(item) for name in names
            )
            matches = [m for m in matches if _supported(m)]
            if not matches:
                raise DataError(f"{item}: directory holds no supported input files")
        elif os.path.exists(item):
            matches = [item]
        elif _HUB_ID.match(item) and not _supported(item):
            hub.append(item)
            continue
        else:
            raise DataError(f"{item}: no such file (and not a Hugging Face dataset name)")
        matches = [m for m in matches if not os.path.isdir(m)]
        if not matches:
            raise DataError(f"{item}: no input files match")
        files += matches
    if hub and (files or len(hub) > 1):
        raise DataError(f"give either one Hugging Face dataset or local files, not {sources}")
    if hub:
        return Corpus(hub_name=hub[0], hf_config=spec.hf_config, hf_split=spec.hf_split, text_field=spec.text_field)
    for path in files:
        builder_for(path)  # reject unsupported types before any work starts
    unique = tuple(dict.fromkeys(files))  # a file named by two globs is still read once
    return Corpus(files=unique, text_field=spec.text_field, txt_unit=txt_unit)


def _open_file(path: str, txt_unit: str) -> Any:
    import datasets

    builder = builder_for(path)
    kwargs: dict[str, Any] = {}
    if builder == "json":
        # "utf8" (not "utf-8") makes the json loader decode in Python, where our error handler applies;
        # with "utf-8" it hands raw bytes to pyarrow, which fails on invalid UTF-8.
        kwargs = {"encoding": "utf8", "encoding_errors": _MARK_ERRORS}
    elif builder == "text":
        kwargs = {"encoding_errors": _MARK_ERRORS, "sample_by": txt_unit}
    return datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **kwargs)


def _open_hub(corpus: Corpus) -> Any:
    import datasets

    try:
        return datasets.load_dataset(corpus.hub_name, corpus.hf_config, split=corpus.hf_split, streaming=True)
    except Exception as e:  # offline, unknown name, missing config: one clear message
        raise DataError(
            f"{corpus.hub_name}: no such local file, and it could not be opened as a Hugging Face dataset "
            f"({type(e).__name__}: {e})"
        ) from e


def _text_batches(
    open_dataset: Callable[[], Any], origin: str, field: str, batch_size: int
) -> Iterator[list[str]]:
    seen = 0
    try:
        # Opened here, when reached, so that any error names the file being read.
        for batch in open_dataset().iter(batch_size=batch_size):
            texts = batch.get(field)
            if texts is None:
                raise DataError(
                    f"{origin}: records have no field {field!r} (fields: {sorted(batch)}); "
                    "pass the right --text-field"
                )
            if not all(type(t) is str for t in texts):
                bad = next(i for i, t in enumerate(texts) if type(t) is not str)
                what = "is missing" if texts[bad] is None else f"is a {type(texts[bad]).__name__}, not text"
                raise DataError(f"{origin}: record {seen + bad} (0-based): field {field!r} {what}")
            seen += len(texts)
            yield texts
    except DataError:
        raise
    except Exception as e:  # pyarrow / json / decompression errors, all meaning "bad file"
        raise DataError(f"{origin}: cannot read record {seen} onwards: {type(e).__name__}: {e}") from e


def iter_documents(
    corpus: Corpus,
    *,
    start: int = 0,
    file_docs: dict[int, int] | None = None,
    on_file_done: Callable[[int, int], None] | None = None,
    batch_size: int = 512,
) -> Iterator[list[str]]:
    """Yield the corpus's documents in order, in batches, beginning with document number ``start``.

    ``file_docs`` (file index -> document count, from an earlier run) lets whole files before ``start``
    be skipped unopened; ``on_file_done(file_index, count)`` reports each file's count once known.
    """
    file_docs = file_docs or {}
    if corpus.hub_name is not None:
        origin = f"hf:{corpus.hub_name}"
        batches = _text_batches(lambda: _open_hub(corpus), origin, corpus.text_field, batch_size)
        sources: list[tuple[int, Iterator[list[str]]]] = [(0, batches)]
    else:
        sources = []
        for i, path in enumerate(corpus.files):
            known = file_docs.get(i)
            if not sources and known is not None and known <= start:  # only a leading run of files
                start -= known
                if on_file_done is not None:
                    on_file_done(i, known)
                continue
            field = "text" if builder_for(path) == "text" else corpus.text_field
            opener = functools.partial(_open_file, path, corpus.txt_unit)
            sources.append((i, _text_batches(opener, path, field, batch_size)))
    for i, batches in sources:
        count = 0
        for texts in batches:
            count += len(texts)
            if start >= len(texts):  # still before the resume point: read, not tokenized
                start -= len(texts)
                continue
            yield texts[start:] if start else texts
            start = 0
        if on_file_done is not None:
            on_file_done(i, count)

