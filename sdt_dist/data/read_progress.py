"""How far this process has read into its input files, in bytes: the known total of a progress bar.

The readers (Hugging Face streaming loaders, gzip) give no position, but the kernel keeps one for every open
descriptor: `/proc/self/fdinfo/N` on Linux. Files already finished count in full; elsewhere than Linux only
finished files count. A hub dataset has no known size: `total` is None.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from sdt_dist.data.sources import Corpus


class ReadProgress:
    def __init__(self, corpus: Corpus) -> None:
        self._paths = [os.path.realpath(p) for p in corpus.files]
        self._sizes = [os.stat(p).st_size for p in self._paths]
        self.total: int | None = sum(self._sizes) if corpus.hub_name is None else None

    def bytes_read(self, finished: Iterable[int]) -> int:
        """Bytes read so far: the files whose indices are in `finished`, plus the offsets of open ones."""
        done = set(finished)
        position = sum(self._sizes[i] for i in done)
        open_pos = _open_positions()
        for i, path in enumerate(self._paths):
            if i not in done and path in open_pos:
                position += min(open_pos[path], self._sizes[i])
        return position


def _open_positions() -> dict[str, int]:
    """{real path: furthest offset} over this process's open file descriptors (empty without /proc)."""
    out: dict[str, int] = {}
    fd_dir = Path("/proc/self/fd")
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:  # closed meanwhile, or not a file
            continue
        pos = next((int(line.split()[1]) for line in info.splitlines() if line.startswith("pos:")), 0)
        out[target] = max(out.get(target, 0), pos)
    return out
