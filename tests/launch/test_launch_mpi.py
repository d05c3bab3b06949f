"""mpirun -np 2 python launchers/pretrain_owt.py: ranks, world size and the rendezvous come from
MPI.COMM_WORLD (mpi4py) in sdt_dist.parallel.dims; Open MPI from Debian packages (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, launch_env, run_logged, train_args

try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mpirun") is None,
                       reason="mpirun not found (.ci/run installs Debian's openmpi-bin libopenmpi-dev)"),
    pytest.mark.skipif(not HAVE_MPI4PY, reason="mpi4py not installed (scripts/setup.sh installs the [mpi] extra "
                                               "when an MPI library is present)"),
]


def mpirun(np: int, *args: str) -> list[str]:
    # --allow-run-as-root: CI runs as root; --oversubscribe/--bind-to none: 2 ranks on a 2-core machine
    # shared with other work, without pinning both to the cores Open MPI would pick
    return ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(np),
            "python", "launchers/pretrain_owt.py", *args]


def test_mpirun_two_ranks_train(tmp_path: Path, launch_corpus: Path) -> None:
    out = tmp_path / "run"
    log = tmp_path / "mpirun.log"
    env = launch_env(MASTER_PORT=str(free_port()))
    rc = run_logged(mpirun(2, *train_args(launch_corpus, out, "train.max_steps=2")), log, env)
    text = log.read_text()
    assert rc == 0, text[-5000:]
    assert "parallel layout: world=2 TP=1 PP=1 DP=2 ZeRO=1" in text, text[-5000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert len(list((out / "checkpoints" / "step_00000002").glob("rank_*.pt"))) == 2


def test_mpirun_bad_layout_exits_2(tmp_path: Path) -> None:
    """The CLI checks the layout against OMPI_COMM_WORLD_SIZE before MPI or torch.distributed start (mpirun
    aborts the other rank when the first exits, so the reason may be printed once or twice)."""
    proc = subprocess.run(mpirun(2, "--config", "launchers/configs/tiny.yaml", "--set", "train.global_batch_size=24"),
                          cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=120)
    message = ("[sdt-dist] config error: train.global_batch_size: 24 is not divisible by micro_batch_size x "
               "data-parallel = 8 x 2")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
