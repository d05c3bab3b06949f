"""Train a few SelfDistil-T steps under one layout, once per recompute mode, in the same processes; rank 0
writes, for every rank and mode, the losses of three steps, the gradients the optimizer saw at the last one
compared with those of the first mode, and the steady-state peak memory of a step.

usage: torchrun --nproc_per_node N tests/workers/recompute_memory.py OUT.json MODES [key=value ...]
  MODES: comma-separated model.recompute values, the first is the reference (e.g. none,selective,full)

Memory is the resident set size (RSS): its high-water mark during step 1 (step 0 allocated the Adam moments)
minus the RSS just before the model was built; the gradients are copied after that, at step 2. Three things keep
RSS to the tensors alive: glibc's mmap threshold is fixed (set first thing, below; once adapted it keeps freed
blocks up to 32 MiB in its heap, dead activations of earlier steps), freed heap pages are trimmed before each
baseline, and a first, unmeasured run of one step takes the process's one-time allocations (library caches,
communication buffers: some 50-70 MiB here, and ~18 MiB at the first checkpointed attention: the warm-up
recomputes it) out of the measured runs.
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sdt_dist.parallel.dims import init_parallel  # noqa: E402
from sdt_dist.plan.measure import engine_tensor_bytes  # noqa: E402
from sdt_dist.train_module import SDTrainModule  # noqa: E402
from sdt_dist.train_step import train_step  # noqa: E402
from tests.helpers import finish_worker, make_cfg, random_batch  # noqa: E402

STEPS = 3


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # "5": the high-water mark restarts at the current RSS
        fh.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+) kB", fh.read()).group(1)) * 1024


def micro_batches(cfg, dims, step: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of global batch `step` (the same global batch at any layout)."""
    mbs, dp = cfg.train.micro_batch_size, dims.dp
    glob = random_batch(cfg, 100 + step, batch=cfg.train.global_batch_size)
    return [{k: v[(m * dp + dims.dp_rank) * mbs:][:mbs] for k, v in glob.items()}
            for m in range(cfg.train.global_batch_size // (mbs * dp))]


def run_mode(cfg, dims, steps: int = STEPS) -> dict:
    gc.collect()
    _LIBC.malloc_trim(0)  # free pages of the previous run go back too: the baseline is what is in use
    baseline = rss()
    tm = SDTrainModule(cfg, dims)
    inner = getattr(tm.engine.optimizer, "optimizer", tm.engine.optimizer)
    grads: list[torch.Tensor] = []
    losses: list[float] = []

    def capture(opt, _args, _kwargs) -> None:  # the gradients AdamW steps with (reduced, clipped, this partition)
        if len(losses) == STEPS - 1:
            grads.extend(p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None)

    hook = inner.register_step_pre_hook(capture)
    peak = 0
    for step in range(steps):
        if step == 1:  # steady state: everything a step keeps is allocated by now
            reset_peak_rss()
        losses.append(train_step(tm, micro_batches(cfg, dims, step), step).loss)
        if step == 1:
            peak = peak_rss() - baseline
    hook.remove()
    states = engine_tensor_bytes(tm)  # after the steps: Adam's moments exist
    tm.engine.destroy()
    del tm, inner
    return {"losses": losses, "grads": grads, "peak": peak, "engine_bytes": states}


def compare(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> tuple[bool, float]:
    """(bitwise equal, largest |g - ref| / max |ref| over tensors)."""
    assert len(grads) == len(ref) > 0, (len(grads), len(ref))
    equal = all(torch.equal(g, r) for g, r in zip(grads, ref))
    rel = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(grads, ref))
    return equal, rel


def main() -> None:
    out_path, modes, overrides = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    base = make_cfg(*overrides)
    dims = init_parallel(base.parallel.tensor, base.parallel.pipeline, base.parallel.zero_stage)
    run_mode(make_cfg(*overrides, "model.recompute=selective"), dims, steps=1)
    runs = {mode: run_mode(make_cfg(*overrides, f"model.recompute={mode}"), dims) for mode in modes}
    ref = runs[modes[0]]["grads"]
    mine = {mode: {"losses": r["losses"], "peak": r["peak"], "engine_bytes": r["engine_bytes"],
                   "numel": sum(g.numel() for g in r["grads"]),
                   "grads_equal": compare(r["grads"], ref)[0], "grads_rel": compare(r["grads"], ref)[1]}
            for mode, r in runs.items()}
    ranks = [None] * dims.world_size
    dist.all_gather_object(ranks, {"rank": dims.rank, "pp_rank": dims.pp_rank, "modes": mine})
    if dims.rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"tp": dims.tp, "pp": dims.pp, "dp": dims.dp, "ranks": ranks}, fh)


if __name__ == "__main__":
    main()
    finish_worker()
