"""Train three SelfDistil-T steps under each DeepSpeed JSON given, on every rank; rank 0 writes the outcome.

usage: torchrun --nproc_per_node 2 tests/workers/ds_step_worker.py OUT.json ds_configs/X.json:STAGE ...

All configs run in one process group: one startup instead of one per file. A config that DeepSpeed
refuses on this machine is recorded with DeepSpeed's own message, never replaced by something that runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from sdt_dist.parallel.dims import init_parallel
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import finish_worker, make_cfg, random_batch


def run_one(path: str, stage: int, dims) -> dict:
    # no dropout / LayerDrop and a large constant LR: three steps on one batch must lower its loss
    cfg = make_cfg(f"parallel.ds_config={path}", f"parallel.zero_stage={stage}", "train.global_batch_size=8",
                   "model.dropout=0", "distill.layerdrop_p=0", "train.lr=0.01", "train.warmup_steps=0")
    try:
        tm = SDTrainModule(cfg, dataclasses.replace(dims, zero_stage=stage))
    except ValueError as e:
        acc = get_accelerator()
        if "fp16 is not supported" in str(e) and not acc.is_fp16_supported():
            return {"skip": f"DeepSpeed's {acc.device_name()} accelerator has no fp16 on this machine "
                            f"(is_fp16_supported() is False: on CPU it needs torch.ops.mkldnn."
                            f"_is_mkldnn_fp16_supported(), i.e. AVX512-FP16/AMX-FP16); deepspeed.initialize "
                            f"raised: {e}"}
        raise
    batch = random_batch(cfg, seed=dist.get_rank())
    # three applied steps; under fp16 the dynamic loss scale starts at 2^16, and the steps whose scaled
    # gradients overflow are skipped (weights untouched) until it has come down
    losses, skipped = [], 0
    for step in range(40):
        result = train_step(tm, [batch], step)
        if result.skipped:
            skipped += 1
            continue
        losses.append(result.loss)
        if len(losses) == 3:
            break
    engine = tm.engine
    return {"losses": losses, "skipped": skipped, "stage": engine.zero_optimization_stage(),
            "bf16": engine.bfloat16_enabled(), "fp16": engine.fp16_enabled(),
            "offload": bool(engine.zero_cpu_offload()),
            "optimizer": type(engine.optimizer).__name__}


def main() -> None:
    out_path, specs = sys.argv[1], sys.argv[2:]
    dims = init_parallel(1, 1, 1)
    results = {}
    for spec in specs:
        path, stage = spec.rsplit(":", 1)
        try:  # construction errors are the same on every rank, so both ranks go on to the next file
            results[spec] = run_one(path, int(stage), dims)
        except Exception:
            results[spec] = {"error": traceback.format_exc()}
    if dims.rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
    finish_worker()
