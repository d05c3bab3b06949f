"""What an interrupted or finished shard build left behind, and whether it may be reused: the same settings,
tokenizer and input; shards whose files still verify."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import check_files
from sdt_dist.data.sources import Corpus
from sdt_dist.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def check_same_build(
    manifest: dict[str, Any], path: Path, settings: dict[str, Any], tok: Tokenizer, corpus: Corpus
) -> None:
    """A finished directory may only be reused (or repaired) for the very same build."""
    files = [{"path": f["path"], "bytes": f.get("bytes")} for f in manifest["input"]["files"]]
    now = [
        {"path": d.get("path", f"hf:{d.get('hub')}"), "bytes": d.get("bytes")} for d in corpus.describe()
    ]
    problems = []
    if manifest["settings"] != settings:
        problems.append(diff(manifest["settings"], settings))
    if manifest["tokenizer"]["sha256"] != tok.sha256:
        problems.append(f"tokenizer {manifest['tokenizer']['source']} then, {tok.path} (different sha256) now")
    if files != now:
        problems.append("the input files differ")
    if problems:
        raise DataError(
            f"{path}: this directory was prepared differently ({'; '.join(problems)}); "
            "use another --out or delete it"
        )


def keep_finished(out: Path, records: dict[str, dict[str, Any]], splits: tuple[str, ...]) -> list[dict[str, Any]]:
    """Of the recorded shards, keep per split the run from index 0 whose files are intact."""
    kept = []
    for split in splits:
        ordered = sorted((r for r in records.values() if r["split"] == split), key=lambda r: r["index"])
        for expected, record in enumerate(ordered):
            if record["index"] != expected:
                break
            entries = [(name, meta["bytes"], meta["sha256"]) for name, meta in record["files"].items()]
            try:
                check_files(out, entries, quick=False)
            except DataError as e:
                logger.warning("rebuilding from %s on: %s", record["name"], e)
                break
            kept.append(record)
    return kept
