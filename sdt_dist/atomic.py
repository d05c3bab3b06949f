"""Atomic file writes: a reader (a resuming run, sweep or shard builder) sees the old file or the complete
new one, never a partial one, even if the writer is killed midway."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any, sort_keys: bool = False) -> None:
    """`sort_keys=True` for files compared byte for byte (manifests, checkpoint metadata)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=sort_keys) + "\n")
