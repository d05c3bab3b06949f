"""Environment and path defaults, in one place: where corpora are found (the OpenWebText-1000 sample shipped in
`data/`, the shared data folder), and DeepSpeed's accelerator for the in-process tools.

`SDT_SHARED_DATA` names a folder of corpora (WikiText-2, Tiny Shakespeare, OpenWebText-1000, ...); unset,
it defaults to `../shared/data` beside the checkout. OpenWebText-1000 is taken from there when the variable
is set, and otherwise from the copy in this repository, so a fresh clone trains and tests offline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWT1000_NAME = "openwebtext-1000/openwebtext-1000.jsonl.gz"
BUNDLED_OWT1000 = REPO / "data" / OWT1000_NAME
_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def shared_data_dir() -> Path:
    return Path(os.environ.get("SDT_SHARED_DATA") or REPO.parent / "shared" / "data")


def owt1000() -> Path:
    """OpenWebText-1000: `$SDT_SHARED_DATA/openwebtext-1000/...` when the variable is set, else the bundled copy."""
    return shared_data_dir() / OWT1000_NAME if os.environ.get("SDT_SHARED_DATA") else BUNDLED_OWT1000


def expand_vars(text: str) -> str:
    """`$VAR` / `${VAR}` from the environment, `SDT_SHARED_DATA` defaulting as above; unknown names stay as they
    are (as `os.path.expandvars`). The default is not written into the environment: `owt1000` must still see
    whether the user set the variable."""
    env = {**os.environ, "SDT_SHARED_DATA": str(shared_data_dir())}
    return _VAR.sub(lambda m: env.get(m.group(1) or m.group(2), m.group(0)), text)


def default_accelerator_env() -> None:
    """`DS_ACCELERATOR=cpu` unless set or CUDA is present: DeepSpeed's accelerator must match the device that
    sdt-eval and sdt-sweep evaluate on (the trainer's launchers set it themselves)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

