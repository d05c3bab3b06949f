"""Train a few SelfDistil-T steps on synthetic batches under one or more parallel layouts, one after another
in the same processes, and save a real checkpoint of each (one launch instead of one per layout).

usage: torchrun --nproc_per_node N tests/workers/save_checkpoint.py ROOT SP_MODEL STEPS CASES_JSON
  CASES_JSON: {"name": [key=value, ...], ...}; case `name` is saved under ROOT/name/checkpoints/
"""

import json
import sys
from pathlib import Path

from megatron.core import parallel_state as ps

from sdt_dist import checkpoint
from sdt_dist.data.tokenizer import Tokenizer
from sdt_dist.parallel.dims import init_parallel
from tests.helpers import finish_worker, make_cfg, run_probe


def main() -> None:
    root, sp_model, steps, cases = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    for name, overrides in cases.items():
        cfg = make_cfg(f"data.tokenizer={sp_model}", *overrides)
        if ps.model_parallel_is_initialized():  # the previous case's TP/PP groups; the world stays
            ps.destroy_model_parallel()
        dims = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage)
        tm = run_probe(cfg, dims, steps)["tm"]
        meta = {"config": cfg.to_dict(), "config_sha256": cfg.sha256(), "tokenizer_sha256": Tokenizer(sp_model).sha256,
                "world_size": dims.world_size, "layout": dims.describe(), "step": steps,
                "consumed_samples": steps * cfg.train.global_batch_size}
        checkpoint.save(tm, root / name / "checkpoints", steps, meta["consumed_samples"], meta, keep=1)


if __name__ == "__main__":
    main()
    finish_worker()
