"""The EMA teacher's forward over two data-parallel ranks in bf16 (ZeRO-1, two micro-batches a step), on real
ranks, with `distill.teacher_gather` MODE (module | step):
  * its slices travel in bf16, and the allocator's peak while its largest module is gathered is what sdt-plan
    estimates;
  * its forward equals bitwise that of the same fp32 teacher cast to bf16 whole on one rank, the next module's
    all-gather in flight while a module runs;
  * three training steps: their losses and the teacher after them (compared across modes by the test), and how
    many all-gathers the third step ran.

usage: torchrun --nproc_per_node 2 tests/workers/teacher_gather.py OUT.json MODE
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from sdt_dist.parallel.dims import destroy_parallel, init_parallel
from sdt_dist.plan.inventory import parameter_inventory
from sdt_dist.plan.memory import plan_layout, run_layout, run_precision
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import train_step
from tests.helpers import allocation_peak, make_cfg, random_batch


def main() -> None:
    out_path, mode = sys.argv[1], sys.argv[2]
    cfg = make_cfg("parallel.ds_config=ds_configs/bf16.json", "parallel.zero_stage=1", "model.dropout=0",
                   "distill.ema_tau=0.5", "train.global_batch_size=16", f"distill.teacher_gather={mode}")
    dims = init_parallel(1, 1, 1)
    tm = SDTrainModule(cfg, dims)
    teacher = tm.teacher
    result: dict = {"dp": dims.dp, "units": len(teacher.units), "losses": []}

    def step(i: int) -> None:
        micro = [random_batch(cfg, 100 * i + 10 * dims.dp_rank + m) for m in range(2)]
        r = train_step(tm, micro, i)
        result["losses"].append([r.loss, r.loss_lm, r.loss_kd, r.loss_align])

    step(0)  # the teacher now averages two different students
    _, lo, hi = max(teacher.units, key=lambda u: sum(teacher.numels[u[1]:u[2]]))
    result["gathered_dtype"] = str(teacher._gather(lo, hi, teacher.compute_dtype).dtype)
    _, result["peak"] = allocation_peak(lambda: teacher._materialize(lo, hi))
    teacher._release(lo, hi)
    result["unit_numel"] = sum(teacher.numels[lo:hi])
    (stage,) = plan_layout(cfg, parameter_inventory(cfg), run_layout(cfg, dims.world_size),
                           run_precision(cfg, dims.dp))
    result["planned"] = stage.estimated["teacher_gathered"]

    tokens = random_batch(cfg, 7)["tokens"]
    # which unit's all-gather is in flight when unit 2 (the second layer) starts: the prefetch of unit 3
    in_flight: list = []
    hook = teacher.units[2][0].register_forward_pre_hook(
        lambda *_: in_flight.append(teacher._next[0] if teacher._next else None))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = teacher(tokens)
    hook.remove()
    result["forward_gathers"], result["in_flight_at_unit_2"] = _all_gathers(prof), in_flight
    # the reference: every fp32 teacher value gathered, cast to bf16 on this rank, and a plain forward of them
    for p, value in zip(teacher.params, teacher.full_parameters()):
        p.data = value.to(teacher.compute_dtype)
    with torch.no_grad():
        ref = teacher.module(tokens)
    teacher._release(0, len(teacher.params))
    same = torch.equal(out.logits, ref.logits) and out.hidden.keys() == ref.hidden.keys() and all(
        torch.equal(out.hidden[k], ref.hidden[k]) for k in out.hidden)
    agree = torch.tensor([float(same)])
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    result["dtype"], result["bitwise"] = str(out.logits.dtype), bool(agree.item())

    step(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(2)
    result["step_gathers"] = _all_gathers(prof)  # the teacher's and ZeRO-1's (the updated partitions)
    final = teacher.full_parameters()
    if dist.get_rank() == 0:
        torch.save(final, out_path + ".teacher.pt")
        with open(out_path, "w") as f:
            json.dump(result, f)
    tm.engine.destroy()
    destroy_parallel()


def _all_gathers(prof: profile) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "c10d::_allgather_base_")


if __name__ == "__main__":
    main()
