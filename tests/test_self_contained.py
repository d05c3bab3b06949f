"""A fresh clone trains and tests offline: quickstart's config and the tests' corpus resolve inside the clone
when no `../shared` folder exists beside it and `SDT_SHARED_DATA` is unset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

_PROBE = """
import json, sdt_dist
from sdt_dist.config import load_config
from sdt_dist.paths import owt1000, shared_data_dir
cfg = load_config("launchers/configs/tiny.yaml", [])
print(json.dumps({"package": sdt_dist.__file__, "source": cfg.data.source, "owt": str(owt1000()),
                  "shared": str(shared_data_dir())}))
"""


def test_tiny_yaml_and_the_tests_corpus_resolve_inside_a_clone_without_a_shared_folder(tmp_path):
    clone = tmp_path / "repo"  # tmp_path/shared, where SDT_SHARED_DATA would default to, does not exist
    for part in ("sdt_dist", "launchers/configs", "ds_configs", "data/openwebtext-1000"):
        shutil.copytree(REPO / part, clone / part, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "SDT_SHARED_DATA"}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=clone, env={**env, "PYTHONPATH": str(clone)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert Path(got["package"]).is_relative_to(clone)  # the copy was imported, not this checkout
    assert got["shared"] == str(tmp_path / "shared" / "data") and not (tmp_path / "shared").exists()
    source = clone / got["source"]  # relative to the repository root, where quickstart.sh runs
    assert source.is_file() and source.resolve().is_relative_to(clone)
    assert Path(got["owt"]).is_file() and Path(got["owt"]).is_relative_to(clone)  # tests/helpers.py OWT
