"""Run SelfDistil-T steps on synthetic data under a parallel layout; rank 0 writes what the tests compare.

usage: torchrun --nproc_per_node N tests/workers/layout_probe.py OUT.json STEPS [key=value ...]
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from sdt_dist.distill.freezing import frozen_parameters
from sdt_dist.parallel.dims import init_parallel
from tests.helpers import ema_closed_form, finish_worker, make_cfg, random_batch, run_probe


def resident_numel(module: torch.nn.Module) -> int:
    """Weights this rank holds (a ZeRO-3 partition or a released teacher weight holds none here)."""
    return sum(p.numel() for p in module.parameters())


def digest(t: torch.Tensor) -> str:
    """Dtype, shape and bytes of a tensor, hashed."""
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode() + raw).hexdigest()


def main() -> None:
    out_path, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    cfg = make_cfg(*overrides)
    dims = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage)
    out = run_probe(cfg, dims, steps, measure_init=True)
    tm = out["tm"]
    per_step = torch.tensor([[r.loss, r.loss_lm, r.loss_kd, r.loss_align] for r in out["records"]],
                            dtype=torch.float64)
    dist.all_reduce(per_step, group=dims.dp_group)
    per_step /= dims.dp
    taus = [r.tau for r in out["records"]]
    ema_err = max((a.double() - b).abs().max().item()
                  for a, b in zip(out["teacher"], ema_closed_form(out["history"], taus, out["copied"])))
    frozen = frozen_parameters(tm.gpt, tm.frozen, cfg.distill.freeze_embedding)
    frozen_idx = sorted(tm.frozen_indices())
    unchanged = all(torch.equal(h[i], out["history"][-1][i]) for h in out["history"][-3:] for i in frozen_idx)
    # a trainable embedding (distill.freeze_embedding=false) still moves in the steps after the last milestone;
    # -1 where this rank holds none of it (a later pipeline stage)
    emb_ids = {id(p) for p in tm.gpt.embedding.parameters()}
    emb_idx = [i for i, p in enumerate(tm.student_gpt_params())
               if id(p) in emb_ids and getattr(p, "ds_numel", p.numel()) > 0]
    emb_moved = -1.0 if not emb_idx else float(all(
        any(not torch.equal(a[i], b[i]) for i in emb_idx) for a, b in zip(out["history"][-3:], out["history"][-2:])))
    inner = getattr(tm.engine.optimizer, "optimizer", tm.engine.optimizer)
    ids = {id(p) for p in frozen}
    in_opt = any(id(p) in ids for g in inner.param_groups for p in g["params"])
    in_opt = in_opt or any(id(p) in ids for p in inner.state)
    rank_info = torch.tensor([[tm.teacher.local_numel(), tm.teacher.full_numel(), ema_err, float(unchanged),
                               float(in_opt), out["opt_numel"][0], out["opt_numel"][-1], len(frozen_idx), emb_moved,
                               resident_numel(tm.gpt), resident_numel(tm.teacher_gpt)]],
                             dtype=torch.float64)
    # rows of a hidden state on this rank: the whole sequence, or its 1/TP slice under sequence parallelism
    hidden_rows = None
    if dims.pp == 1:
        hidden_rows = next(iter(tm.teacher(random_batch(cfg, 0)["tokens"]).hidden.values())).shape[0]
    gathered = [torch.zeros_like(rank_info) for _ in range(dims.world_size)]
    dist.all_gather(gathered, rank_info)
    # per rank: engine bytes after the first step (sdt_dist/plan/measure.py), the allocation peak of building the
    # SDTrainModule, and a digest of each initial student weight it holds (bitwise comparisons across layouts)
    init_digests = {n: digest(t) for n, t in out["init_weights"].items()}
    per_rank = [None] * dims.world_size
    dist.all_gather_object(per_rank, (out["engine_bytes"], out["init_peak"], init_digests))
    engine_bytes, init_peak, init_digests = (list(column) for column in zip(*per_rank))
    if dims.rank == 0:
        json.dump({"losses": per_step.tolist(), "frozen": out["frozen"],
                   "dropped": [r.dropped_layers for r in out["records"]],
                   "ranks": [g[0].tolist() for g in gathered], "dp": dims.dp, "tp": dims.tp,
                   "hidden_rows": hidden_rows, "engine_bytes": engine_bytes, "init_peak": init_peak,
                   "init_digests": init_digests},
                  open(out_path, "w"))


if __name__ == "__main__":
    main()
    finish_worker()
