"""``manifest.json`` of a prepared directory: what was built from what, and the sizes and checksums that
let training refuse truncated or altered files before it starts."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sdt_dist.data.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sdt-dist-shards/2"
# Format 1 (before 2026-12-02) split by the 0-based input index and had no slices; its directories still load.
READABLE_FORMATS = ("sdt-dist-shards/1", MANIFEST_FORMAT)
REBUILD_HINT = "re-run data_prep/build_owt_shards.py with the same arguments to rebuild it"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        # Large blocks: hashlib releases the GIL on them, so files_sha256's threads really run in parallel.
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def files_sha256(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_sha256, paths))


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, its own checksum field left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{path}: missing; {prepared_dir} is not a prepared corpus or its build did not finish "
            "(run data_prep/build_owt_shards.py, which resumes an interrupted build)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path}: unknown manifest format {found!r} (expected one of {READABLE_FORMATS})")
    # The manifest vouches for every other file; its own checksum catches an edit to it.
    if manifest.get("manifest_sha256") != manifest_checksum(manifest):
        raise DataError(f"{path}: altered (its content does not match its manifest_sha256); {REBUILD_HINT}")
    return manifest


def manifest_files(manifest: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(path relative to the prepared dir, bytes, sha256) of every file the manifest vouches for."""
    tok = manifest["tokenizer"]
    entries = [(tok["model"], tok["bytes"], tok["sha256"])]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            entries += [(name, meta["bytes"], meta["sha256"]) for name, meta in sorted(shard["files"].items())]
    return entries


def check_files(root: str | Path, entries: list[tuple[str, int, str]], *, quick: bool) -> None:
    """Raise DataError naming the first missing, resized or (unless ``quick``) altered file."""
    root = Path(root)
    # All sizes first: a truncated file is caught without reading anything.
    for rel, size, _ in entries:
        path = root / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{path}: missing (listed in the manifest); {REBUILD_HINT}") from None
        if actual != size:
            raise DataError(
                f"{path}: {actual} bytes but the manifest records {size}: truncated or altered; {REBUILD_HINT}"
            )
    if quick:
        return
    digests = files_sha256([root / rel for rel, _, _ in entries])
    for (rel, _, sha), actual_sha in zip(entries, digests, strict=True):
        if actual_sha != sha:
            raise DataError(
                f"{root / rel}: sha256 {actual_sha[:16]}... differs from the manifest's {sha[:16]}...: "
                f"the file was altered; {REBUILD_HINT}"
            )


def verify_prepared(out_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Check every file of a prepared directory against its manifest and return the manifest.

    Sizes are checked first (cheap); then, unless ``quick``, the sha256 of every file. Raises DataError
    naming the file at fault.
    """
    manifest = read_manifest(out_dir)
    check_files(out_dir, manifest_files(manifest), quick=quick)
    return manifest
