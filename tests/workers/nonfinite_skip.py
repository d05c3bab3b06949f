"""Inject non-finite steps into a real multi-rank run and compare it with a run that never takes those steps.

usage: torchrun --nproc_per_node N tests/workers/nonfinite_skip.py OUT.json FAULTS [key=value ...]
FAULTS: comma-separated `<step>:<kind>@<rank>`, kind `grad` (one parameter's gradient made infinite by a hook,
the loss stays finite) or `loss` (the total loss made NaN in its value only: its gradient stays finite; patched in
`losses.combine_losses`, the one place every layout forms it).
Rank 0 writes, per rank: whether each faulty step was skipped, whether weights, Adam state and teacher stayed
bitwise the same across it, and whether the rest of the run equals the reference bitwise.
"""

import json
import sys

import torch
import torch.distributed as dist

from sdt_dist.distill import losses
from sdt_dist.parallel.dims import init_parallel
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import finish_worker, full_student_params, make_cfg, random_batch

STEPS = 5


def micro_batches(cfg, dims, step: int) -> list[dict[str, torch.Tensor]]:
    glob = random_batch(cfg, 100 + step, batch=cfg.train.global_batch_size)
    mbs = cfg.train.micro_batch_size
    gas = cfg.train.global_batch_size // (mbs * dims.dp)
    return [{k: v[(m * dims.dp + dims.dp_rank) * mbs:][:mbs] for k, v in glob.items()} for m in range(gas)]


def inject(tm: SDTrainModule, kind: str):
    """Start the fault; returns the function that ends it."""
    if kind == "grad":
        param = next(p for p in tm.engine.module.parameters() if p.requires_grad)
        return param.register_hook(lambda g: torch.full_like(g, float("inf"))).remove
    real = losses.combine_losses
    losses.combine_losses = lambda *a, **k: (lambda t: t + t.detach() * float("nan"))(real(*a, **k))
    return lambda: setattr(losses, "combine_losses", real)


def state(tm: SDTrainModule) -> list[torch.Tensor]:
    """Weights and teacher (whole, collective), and this rank's Adam state (moments and step counts of its
    fp32 partitions: over all ranks, the whole of it)."""
    inner = getattr(tm.engine.optimizer, "optimizer", tm.engine.optimizer)
    adam = [torch.as_tensor(v).clone() for s in inner.state.values() for v in s.values()]
    return full_student_params(tm) + adam + tm.teacher.full_parameters()


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    out_path, fault_spec, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    faults = {int(s): (kind, int(r)) for s, rest in (f.split(":") for f in fault_spec.split(","))
              for kind, r in [rest.split("@")]}
    cfg = make_cfg(*overrides)
    dims = init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.zero_stage)
    tm = SDTrainModule(cfg, dims)
    row = {"skipped": [], "loss_finite": [], "unchanged": [], "losses": [], "others_skipped": []}
    for step in range(STEPS):
        batch = micro_batches(cfg, dims, step)
        if step not in faults:
            res = train_step(tm, batch, step)
            row["losses"].append(res.loss)
            row["others_skipped"].append(res.skipped)
            continue
        kind, rank = faults[step]
        before = state(tm)
        end = inject(tm, kind) if dims.rank == rank else (lambda: None)
        res = train_step(tm, batch, step)
        end()
        row["skipped"].append(res.skipped)
        row["loss_finite"].append(bool(torch.isfinite(torch.tensor(res.loss))))
        row["unchanged"].append(same(before, state(tm)))
    # the reference: the same run, built the same way, that never takes the faulty steps
    ref = SDTrainModule(cfg, dims)
    row["losses_ref"] = [train_step(ref, micro_batches(cfg, dims, step), step).loss
                         for step in range(STEPS) if step not in faults]
    row["final_equal"] = same(state(tm), state(ref))
    rows = [None] * dims.world_size
    dist.all_gather_object(rows, row)
    if dims.rank == 0:
        json.dump(rows, open(out_path, "w"))


if __name__ == "__main__":
    main()
    finish_worker()
