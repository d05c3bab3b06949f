"""Save checkpoints at some layouts, resume them at others; rank 0 writes what tests/test_resume_layout.py checks.

usage: torchrun --nproc_per_node N tests/workers/resume_layout.py OUT_DIR save|resume [SOURCE ...]
  save (2 ranks): per source layout, train K steps, save, train N more (the uninterrupted run), then resume the
    checkpoint at its own layout and at TP=1 x DP=2 (ZeRO-2) and train N steps each;
  resume (1 rank): resume each checkpoint at one rank (ZeRO-0) and train N steps.
Layouts change inside one process (megatron's model-parallel state is rebuilt), to keep launches few.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors.torch import load_file, save_file

from sdt_dist import checkpoint
from sdt_dist.parallel.dims import init_parallel
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import finish_worker, make_cfg, random_batch

K, N = 4, 3  # freezing after steps 3 and 6 (BASE): saved with 1 layer frozen, the second milestone comes after
BASE = ["model.dropout=0", "distill.layerdrop_p=0", "train.max_steps=12", "train.global_batch_size=8",
        "model.tie_embeddings=false", "distill.freeze_milestones=[0.25,0.5]", "distill.freeze_fractions=[0.25,0.5]",
        "distill.ema_tau=0.9"]
SOURCES = {"tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"], "zero3_dp2": ["parallel.zero_stage=3"]}
TARGETS = {2: {"dp2_zero2": ["parallel.zero_stage=2"]}, 1: {"one_rank": ["parallel.zero_stage=0"]}}


def build(overrides: list[str]) -> SDTrainModule:
    cfg = make_cfg(*BASE, *overrides)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    return SDTrainModule(cfg, init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage))


def train(tm: SDTrainModule, first: int, n: int) -> dict:
    """Steps first..first+n-1; global batch b (seed 100+b) split over DP ranks as MicroBatchIterator does."""
    cfg, dims = tm.cfg, tm.dims
    mbs, dp = cfg.train.micro_batch_size, dims.dp
    rows, frozen = [], []
    for step in range(first, first + n):
        glob = random_batch(cfg, 100 + step, batch=cfg.train.global_batch_size)
        micro = [{k: v[(m * dp + dims.dp_rank) * mbs:][:mbs] for k, v in glob.items()}
                 for m in range(cfg.train.global_batch_size // (mbs * dp))]
        res = train_step(tm, micro, step)
        rows.append([res.loss, res.loss_lm, res.loss_kd, res.loss_align])
        frozen.append(tm.frozen)
    losses = torch.tensor(rows, dtype=torch.float64)
    dist.all_reduce(losses, group=dims.dp_group)
    return {"losses": (losses / dp).tolist(), "frozen": frozen}


def record(tm: SDTrainModule, out: Path, name: str, info: dict) -> None:
    student, teacher = tm.export_state()
    if dist.get_rank() == 0:
        save_file(student, str(out / f"{name}.student.safetensors"))
        save_file(teacher, str(out / f"{name}.teacher.safetensors"))
        (out / f"{name}.json").write_text(json.dumps(info))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resume(out: Path, source: str, target: str, overrides: list[str]) -> None:
    ckpt = out / source / "checkpoints" / f"step_{K:08d}"
    tm = build(overrides)
    extra = checkpoint.load(tm, ckpt)
    info = {"step": extra["step"], "consumed_samples": extra["consumed_samples"], "frozen_at_load": tm.frozen}
    student, teacher = tm.export_state()  # what this layout now holds, whole, against what was saved
    if dist.get_rank() == 0:
        info["student_load_err"] = max_diff(student, load_file(str(ckpt / "export" / "student.safetensors")))
        info["teacher_load_err"] = max_diff(teacher, load_file(str(ckpt / "export" / "teacher.safetensors")))
    info.update(train(tm, extra["step"], N))
    record(tm, out, f"{source}.{target}", info)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    for source, overrides in SOURCES.items():
        if sys.argv[3:] and source not in sys.argv[3:]:
            continue
        if mode == "save":
            tm = build(overrides)
            train(tm, 0, K)
            meta = {"config": tm.cfg.to_dict(), "config_sha256": tm.cfg.sha256(), "tokenizer_sha256": "none",
                    "world_size": tm.dims.world_size, "layout": tm.dims.describe(), "step": K,
                    "consumed_samples": K * tm.cfg.train.global_batch_size}
            checkpoint.save(tm, out / source / "checkpoints", K, meta["consumed_samples"], meta, keep=1)
            record(tm, out, f"{source}.uninterrupted", train(tm, K, N))
            resume(out, source, "same", overrides)
        for target, target_overrides in TARGETS[int(os.environ["WORLD_SIZE"])].items():
            resume(out, source, target, target_overrides)


if __name__ == "__main__":
    main()
    finish_worker()
