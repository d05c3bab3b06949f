"""Shared frozen trunk: the teacher's forward takes the output states of the frozen prefix from the student's
forward instead of recomputing them.

That is exact (bitwise) when both sides compute the same thing: the embedding and layers 1..j are frozen in the
student and the teacher holds copies of them (`EmaTeacher.copied`: a frozen parameter is copied at the first EMA
update after it froze and never changes again, so not yet in the step right after a milestone), the student runs
them without dropout, and LayerDrop skipped none of them in the micro-batch (`StepPlan.shared`). The teacher then
neither gathers nor runs the embedding and those layers. With the embedding training (distill.freeze_embedding
false) the teacher's embedding is an EMA of it: nothing is shared. Under pipeline parallelism each stage runs its
teacher pieces itself: nothing is shared either.
"""

from __future__ import annotations

import torch

from sdt_dist.config import Config
from sdt_dist.distill.freezing import frozen_parameters
from sdt_dist.distill.schedules import frozen_layers_at
from sdt_dist.model.gpt import GPTModel


def trunk_sharing(cfg: Config) -> bool:
    """Whether the run shares the frozen trunk (distill.share_frozen_trunk; None: when model.dropout is 0)."""
    d = cfg.distill
    on = cfg.model.dropout == 0 if d.share_frozen_trunk is None else d.share_frozen_trunk
    return on and d.freeze_embedding and cfg.parallel.pipeline == 1


def scheduled_shared_layers(cfg: Config, step: int) -> int:
    """The layers the teacher shares at 0-based `step` of an uninterrupted run: those frozen in the step before,
    whose EMA update copied them (after a resume, one step later: a checkpoint load forgets the copies)."""
    if step == 0 or not trunk_sharing(cfg):
        return 0
    d, n, total = cfg.distill, cfg.model.num_layers, cfg.train.max_steps
    return min(frozen_layers_at(step, d, n, total), frozen_layers_at(step - 1, d, n, total))


def shared_layers(gpt: GPTModel, frozen: int, params: list[torch.nn.Parameter], copied: frozenset[int]) -> int:
    """The most layers j <= `frozen` whose parameters, and the embedding's, the teacher holds as copies of the
    student's (`copied`: indices into `params`, the teacher's parameter order)."""
    index = {id(p): i for i, p in enumerate(params)}
    for j in range(frozen, 0, -1):
        if all(index[id(p)] in copied for p in frozen_parameters(gpt, j, include_embedding=True)):
            return j
    return 0
