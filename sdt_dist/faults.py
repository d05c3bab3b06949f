"""Fault injection for the crash-safety tests: `SDT_FAULT=<point>@<step>[:rank<r>]` SIGKILLs the process.

Points: `save` (inside checkpoint writing, after the DeepSpeed files, before the rename) and `step`
(after an optimizer step). Unset in normal runs: one environment lookup per call.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_die(point: str, step: int) -> None:
    spec = os.environ.get("SDT_FAULT")
    if not spec:
        return
    where, _, rest = spec.partition("@")
    at, _, rank = rest.partition(":rank")
    if where == point and int(at) == step and (not rank or int(rank) == dist.get_rank()):
        os.kill(os.getpid(), signal.SIGKILL)
