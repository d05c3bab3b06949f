"""Checkpoint integrity: a sha256 of every file of a checkpoint, recorded in its meta.json and checked
before a resume (`resume.py`), so that a truncated or bit-flipped file is found by name instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

META = "meta.json"
_CHUNK = 1 << 22


class CheckpointDamaged(ValueError):
    """A checkpoint file is missing, has the wrong size, or does not match its recorded sha256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digests(ckpt_dir: Path) -> dict[str, dict[str, int | str]]:
    """{relative path: {size, sha256}} of every file under `ckpt_dir` except meta.json."""
    return {p.relative_to(ckpt_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.relative_to(ckpt_dir).as_posix() != META}


def verify(ckpt_dir: Path) -> bool:
    """Raise CheckpointDamaged naming the first bad file; False when the checkpoint records no checksums."""
    try:
        meta = json.loads((ckpt_dir / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointDamaged(f"{ckpt_dir / META}: unreadable ({e})") from None
    files = meta.get("files")
    if files is None:
        return False
    for rel, want in sorted(files.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointDamaged(f"{path}: missing")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointDamaged(f"{path}: {size} bytes, {want['size']} when saved (truncated or overwritten)")
        if sha256_file(path) != want["sha256"]:
            raise CheckpointDamaged(f"{path}: sha256 differs from the one recorded when saved (corrupted)")
    return True
