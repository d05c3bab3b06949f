import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# This interpreter's bin first on PATH, as for the jobs the tests launch (tests/helpers.py worker_env): torch
# builds DeepSpeed's CPU comm op with the `ninja` it finds first, and a different one (the venv's or the system's)
# in this process and in launched jobs makes each rebuild it (about a minute each time) over the other's.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron parallel state with one rank, in this pytest process."""
    from sdt_dist.parallel.dims import init_parallel

    return init_parallel(1, 1, 0)


@pytest.fixture(scope="session")
def owt_small(tmp_path_factory):
    """OpenWebText-1000 prepared with a 512-token vocabulary (~6 s), for tiny real training jobs."""
    from sdt_dist.data.prepare import prepare_corpus
    from tests.helpers import OWT

    if not OWT.is_file():
        pytest.skip(f"{OWT} not present")
    out = tmp_path_factory.mktemp("owt512") / "owt"
    prepare_corpus(str(OWT), out, vocab_size=512, workers=2, progress=False)
    return out
