import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed + megatron parallel state with one rank, in this pytest process."""
    from sdt_dist.parallel.dims import init_parallel

    return init_parallel(1, 1, 0)
