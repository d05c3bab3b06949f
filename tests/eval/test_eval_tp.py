"""TP = 2 with two real processes: vocab-parallel statistics and fused losses equal the full-logit ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port, read_json, worker_env

pytestmark = pytest.mark.slow


def test_tp2_stats_equal_full_logits(tmp_path):
    worker = REPO / "tests" / "workers" / "tp_stats.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(worker), str(tmp_path / "out.json")]
    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = read_json(tmp_path / "out.json")
    for key, err in results.pop("losses").items():  # the fused LM alone and with KD, values and gradient slices
        assert err < 1e-5, key
    for name, r in results.items():
        assert r["nll_err"] < 1e-5 and r["conf_err"] < 1e-6, name
        assert r["correct_equal"], name
        for key in ("ppl", "ece", "accuracy"):
            assert r[key][0] == pytest.approx(r[key][1], rel=1e-6, abs=1e-9), (name, key)
