"""The smallest layout change that makes a plan fit: every layout reachable by changing the ZeRO stage,
recomputation, TP, PP and micro-batch is planned (analytically, from one inventory) and the fitting one
with the lowest cost is returned. Costs order changes by what they take from throughput: a higher ZeRO
stage (more communication) < selective recompute < TP within a node < full recompute (+1 forward)
< PP (bubbles, untied embeddings) < a smaller micro-batch."""

from __future__ import annotations

import dataclasses
import math

from sdt_dist.config import Config, ConfigError, validate
from sdt_dist.plan.devices import Device
from sdt_dist.plan.inventory import ParamInfo
from sdt_dist.plan.memory import Layout, Precision
from sdt_dist.plan.report import Plan, make_plan


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)]


def _valid(cfg: Config, lay: Layout) -> bool:
    p = dataclasses.replace(cfg.parallel, tensor=lay.tp, pipeline=lay.pp, zero_stage=lay.zero, ds_config=None)
    model = dataclasses.replace(cfg.model, recompute=lay.recompute)
    cand = dataclasses.replace(cfg, parallel=p, model=model,
                               train=dataclasses.replace(cfg.train, micro_batch_size=lay.micro_batch))
    try:
        validate(cand, lay.world)
    except ConfigError:
        return False
    return lay.pp == 1 or not cfg.model.tie_embeddings  # pipeline stages need untied embeddings


def _cost(base: Layout, lay: Layout) -> float:
    cost = max(0, lay.zero - base.zero) * 1.0 + {"none": 0, "selective": 1.5, "full": 4}[lay.recompute]
    cost += 2.5 * math.log2(lay.tp / base.tp) + 6 * math.log2(lay.pp / base.pp)
    cost += 8 * math.log2(base.micro_batch / lay.micro_batch)
    return cost


def smallest_fitting_change(cfg: Config, inv: list[ParamInfo], base: Layout, prec: Precision, dev: Device,
                            ranks_per_node: int, headroom: float = 0.0) -> Plan | None:
    best: tuple[float, Plan] | None = None
    micro = [mb for mb in range(1, base.micro_batch + 1) if base.micro_batch % mb == 0]
    for tp in [t for t in _powers_of_two(ranks_per_node) if t >= base.tp]:
        for pp in [p for p in range(base.pp, cfg.model.num_layers + 1) if cfg.model.num_layers % p == 0]:
            if base.world % (tp * pp):
                continue
            for zero in ([1] if pp > 1 else range(base.zero, 4)):
                for recompute in ("none", "selective", "full"):
                    for mb in micro:
                        lay = dataclasses.replace(base, tp=tp, pp=pp, zero=zero, recompute=recompute, micro_batch=mb,
                                                  sequence_parallel=base.sequence_parallel and tp > 1)
                        if lay == base or not _valid(cfg, lay):
                            continue
                        cost = _cost(base, lay)
                        if best is not None and cost >= best[0]:
                            continue
                        plan = make_plan(cfg, inv, lay, prec, dev, headroom=headroom)
                        if plan.fits:
                            best = (cost, plan)
    return None if best is None else best[1]


def as_overrides(base: Layout, lay: Layout) -> list[str]:
    """The --set flags that turn `base` into `lay`."""
    keys = {"tp": "parallel.tensor", "pp": "parallel.pipeline", "zero": "parallel.zero_stage",
            "micro_batch": "train.micro_batch_size", "recompute": "model.recompute",
            "sequence_parallel": "parallel.sequence_parallel"}
    return [f"{key}={getattr(lay, f)}".replace("True", "true").replace("False", "false")
            for f, key in keys.items() if getattr(lay, f) != getattr(base, f)]
