"""One optimizer step of SelfDistil-T, as in the paper's Algorithm 1.

  for each micro-batch:
    1. student forward with LayerDrop (a frozen prefix that includes the embedding runs without autograd)
    2. teacher forward: EMA weights, eval mode, no LayerDrop, no grad (from the student's frozen-prefix states
       where they are its own: `distill/shared_trunk.py`)
    3. losses: LM + lambda_KD * T^2 * KL(teacher || student) + lambda_SD * alignment (`losses.combine_losses`)
    4. backward; DeepSpeed steps the optimizer at the accumulation boundary (AdamW, grad clip)
  5. EMA update of the teacher from the new student weights
  6. freezing milestones
The step's decisions (which layers LayerDrop skips in each micro-batch, which are aligned, how many run
without autograd, how many the teacher shares) are fixed first, in an immutable `StepPlan`;
`SDTrainModule.train_batch` runs steps 1-4 with it, one micro-batch at a time or stage by stage under pipeline
parallelism.
A step whose loss or gradient is not finite on any rank is skipped everywhere: no optimizer update, no EMA
update, no freezing (`parallel/finite_step.py`; DeepSpeed finds a non-finite gradient under ZeRO-1/2/3 and
fp16, we check it under ZeRO-0, and the loss under pipeline parallelism just before the schedule's step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdt_dist.distill.schedules import aligned_layers_at, frozen_layers_at, lr_at, tau_at
from sdt_dist.train_module import SDTrainModule


@dataclass
class StepResult:
    loss: float = 0.0
    loss_lm: float = 0.0
    loss_kd: float = 0.0
    loss_align: float = 0.0
    lr: float = 0.0
    tau: float = 0.0
    frozen_layers: int = 0
    dropped_layers: list[int] = field(default_factory=list)
    aligned_layers: list[int] = field(default_factory=list)
    shared_trunk: int = 0  # frozen layers the teacher took from the student (`StepPlan.shared_trunk`)
    tokens: int = 0
    skipped: bool = False


def train_step(tm: SDTrainModule, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepResult:
    cfg = tm.cfg
    max_steps = cfg.train.max_steps
    aligned = aligned_layers_at(step, cfg.distill, cfg.model.num_layers, max_steps, tm.frozen)
    lr, tau = lr_at(step, cfg.train), tau_at(step, cfg.distill, max_steps)
    tm.set_lr(lr)
    # 1-4. student and teacher forward, losses, backward for each micro-batch; the optimizer step
    plan = tm.plan(step, aligned)
    batch = tm.train_batch(micro_batches, plan)
    result = StepResult(loss=batch.loss, loss_lm=batch.loss_lm, loss_kd=batch.loss_kd, loss_align=batch.loss_align,
                        lr=lr, tau=tau, frozen_layers=tm.frozen, dropped_layers=batch.dropped_layers,
                        aligned_layers=aligned, shared_trunk=plan.shared_trunk, tokens=batch.tokens,
                        skipped=batch.skipped)
    if result.skipped:
        return result
    # 5. EMA update of the teacher, from the student after this step (frozen parameters copied)
    tm.teacher.update(tm.student_gpt_params(), tau, tm.frozen_indices())
    # 6. freezing milestones: the step count after this step decides
    tm.freeze(frozen_layers_at(step + 1, cfg.distill, cfg.model.num_layers, max_steps))
    return result
