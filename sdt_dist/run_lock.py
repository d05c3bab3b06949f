"""One job per run directory: an exclusive `flock` on `<out_dir>/run.lock`, held by global rank 0.

The kernel releases the lock when the holding process dies (even by SIGKILL), so a crashed job never
blocks its own requeue; a second job started on the same directory stops before writing anything and
names the holder (host, pid, start time) that the first job wrote into the lock file. On NFS, Linux
emulates flock with byte-range locks that every client sees; Lustre needs the `flock` mount option.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

LOCK_NAME = "run.lock"


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    """The lock of one run directory; the open descriptor is the lock, so keep this object alive."""

    def __init__(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        # No O_TRUNC: the holder's record must survive a loser's open.
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "a job that has not yet written its name"
            os.close(self._fd)
            raise RunDirLocked(f"{run_dir} is in use by another job ({holder}); give this job its own "
                               f"train.out_dir, or stop the other one first") from None
        os.ftruncate(self._fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        os.write(self._fd, f"host {socket.gethostname()} pid {os.getpid()} started {started}\n".encode())


def lock_run_dir(run_dir: Path, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises `RunDirLocked` if it is held (no rank left in a barrier)."""
    lock, error = None, [None]
    if is_main:
        try:
            lock = RunLock(run_dir)
        except RunDirLocked as e:
            error[0] = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RunDirLocked(error[0])
    return lock
