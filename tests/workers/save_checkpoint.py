"""Train a few SelfDistil-T steps on synthetic batches under a parallel layout and save a real checkpoint.

usage: torchrun --nproc_per_node N tests/workers/save_checkpoint.py RUN_DIR SP_MODEL STEPS [key=value ...]
"""

import os
import sys
from pathlib import Path

from sdt_dist import checkpoint
from sdt_dist.data.tokenizer import Tokenizer
from sdt_dist.parallel.dims import destroy_parallel, init_parallel
from tests.helpers import make_cfg
from tests.sdt_probe import run


def main() -> None:
    run_dir, sp_model, steps, overrides = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    cfg = make_cfg(f"data.tokenizer={sp_model}", *overrides)
    dims = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage)
    tm = run(cfg, dims, steps)["tm"]
    meta = {"config": cfg.to_dict(), "config_sha256": cfg.sha256(), "tokenizer_sha256": Tokenizer(sp_model).sha256,
            "world_size": dims.world_size, "layout": dims.describe(), "step": steps,
            "consumed_samples": steps * cfg.train.global_batch_size}
    checkpoint.save(tm, run_dir / "checkpoints", steps, meta["consumed_samples"], meta, keep=1)
    destroy_parallel()
    # skip C++ static destructors: DeepSpeed's CPU comm op sometimes aborts there (docs: cpu-facts)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
