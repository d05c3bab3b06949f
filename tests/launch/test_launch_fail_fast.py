"""An inconsistent layout stops every rank with exit code 2 and the reason, before any process group exists.

Launchers end the other ranks as soon as one exits non-zero (DeepSpeed's launch.py polls once a second,
mpirun reacts at once), so a rank a few milliseconds slower can be killed before it prints; the launcher
test therefore checks every rank that ran to completion, and the per-rank guarantee is checked by starting
each rank of a 2-rank world alone: it must print the reason and exit 2 without waiting for its peer, which
it would do had it reached the rendezvous.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, launch_env, run_logged

# validate() passes (tiny.yaml's 4 heads, 4096 vocab and 512 FFN all split 4 ways): it is the layout
# check against the launcher's world size of 2 that fails
BAD = ["--config", "launchers/configs/tiny.yaml", "--set", "parallel.tensor=4"]
MESSAGE = "[sdt-dist] config error: parallel.tensor: world size 2 is not divisible by tensor x pipeline = 4 x 1"


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_refuses_alone_before_the_rendezvous(rank: int) -> None:
    env = launch_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, "launchers/pretrain_owt.py", *BAD], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == MESSAGE and proc.stdout == ""


@pytest.mark.slow
def test_deepspeed_launcher_bad_layout(tmp_path: Path) -> None:
    rank_logs = tmp_path / "ranks"
    rank_logs.mkdir()
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()),
           "--enable_each_rank_log", str(rank_logs), "launchers/pretrain_owt.py", *BAD]
    t0 = time.monotonic()
    rc = run_logged(cmd, tmp_path / "launcher.log", launch_env(), timeout=180)
    elapsed = time.monotonic() - t0
    logs = {p.name: p.read_text() for p in sorted(rank_logs.glob("*_rank*.log"))}
    assert rc == 2, (rc, logs, (tmp_path / "launcher.log").read_text()[-3000:])
    assert len(logs) == 2, logs
    finished = {name: text for name, text in logs.items() if text}  # see the module docstring
    assert finished, logs
    for name, text in finished.items():
        assert text.strip() == MESSAGE, (name, text)  # the reason only: no traceback, no process group
    assert elapsed < 120, f"took {elapsed:.0f} s to fail"
