"""One optimizer step of SelfDistil-T, as in the paper's Algorithm 1.

  for each micro-batch:
    1. student forward with LayerDrop (a frozen prefix that includes the embedding runs without autograd)
    2. teacher forward: EMA weights, eval mode, no LayerDrop, no grad
    3. losses: LM + lambda_KD * T^2 * KL(teacher || student) + lambda_SD * alignment
    4. backward; DeepSpeed steps the optimizer at the accumulation boundary (AdamW, grad clip)
  5. EMA update of the teacher from the new student weights
  6. freezing milestones
A step whose loss is not finite on any rank is skipped everywhere: no backward, no optimizer step, no
EMA update; so is one whose gradient is not finite (DeepSpeed finds it under ZeRO-1/2/3 and fp16, we check
it under ZeRO-0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sdt_dist.distill import losses
from sdt_dist.distill.fused_lm_kd import lm_kd_losses
from sdt_dist.distill.layerdrop import sample_dropped
from sdt_dist.distill.schedules import aligned_layers_at, frozen_layers_at, lr_at, tau_at
from sdt_dist.parallel.pipeline import batch_to_pipe
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
    tokens: int = 0
    skipped: bool = False


def sdt_losses(tm: SDTrainModule, batch: dict[str, torch.Tensor], step: int, micro: int,
               aligned: list[int]) -> tuple[dict[str, torch.Tensor], frozenset[int]]:
    """Steps 1-3 for one micro-batch: the loss terms (as tensors) and the layers LayerDrop skipped."""
    d = tm.cfg.distill
    tp_group = ps.get_tensor_model_parallel_group() if tm.dims.tp > 1 else None
    # identical on every rank (TP, PP and DP): ZeRO-3 gathers parameters with DP collectives, so all
    # ranks must run the same layers
    dropped = sample_dropped(tm.drop_probs, tm.cfg.train.seed, step, micro)
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]

    # 1. student forward with LayerDrop; predictors q_l on the aligned layers that ran
    logits, predictions = tm.engine(tokens, skip=dropped, frozen_prefix=tm.no_grad_prefix, aligned=tuple(aligned))
    terms: dict[str, torch.Tensor] = {}
    # 2. teacher forward (no grad, no dropout, no LayerDrop)
    if d.lambda_kd > 0 or predictions:
        teacher = tm.teacher(tokens)
        # 3. LM and KD in one pass over the logits, then the alignment terms
        terms["lm"], terms["kd"] = lm_kd_losses(logits, teacher.logits, labels, mask, d.temperature, tp_group)
        sp_group = tp_group if tm.cfg.parallel.sequence_parallel else None
        terms["align"] = losses.align_loss(predictions, teacher.hidden, tm.layer_map, mask, sp_group,
                                           reduce=d.align_reduce)
    else:
        terms["lm"] = losses.lm_loss(logits, labels, mask, tp_group)
        terms["kd"] = terms["align"] = torch.zeros((), device=logits.device)
    terms["total"] = terms["lm"] + d.lambda_kd * terms["kd"] + d.lambda_sd * terms["align"]
    return terms, dropped


def _all_finite(x: torch.Tensor) -> bool:
    flag = torch.tensor([0.0 if torch.isfinite(x).all() else 1.0], device=x.device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def _zero0_grads_finite(tm: SDTrainModule) -> bool:
    """DeepSpeed checks the gradient norm under ZeRO-1/2/3 and fp16 only; ZeRO-0 would apply AdamW to a
    non-finite gradient. Check it here: one fused norm per rank (a pass over the gradients) and one all-reduce
    of a flag over the world, at the accumulation boundary only."""
    if tm.engine.zero_optimization_stage() != 0:
        return True
    grads = [p.grad for p in tm.engine.module.parameters() if p.grad is not None]
    return _all_finite(torch.stack(torch._foreach_norm(grads)) if grads else torch.zeros(1))


def _step_without_update(engine) -> None:
    """End the accumulation boundary as `engine.step()` does (counters, zeroed gradients) without letting the
    optimizer touch weights or Adam state."""
    optimizer = engine.optimizer
    optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method for this call
    try:
        engine.step()
    finally:
        del optimizer.step


def train_step(tm: SDTrainModule, micro_batches: list[dict[str, torch.Tensor]], step: int) -> StepResult:
    cfg = tm.cfg
    max_steps = cfg.train.max_steps
    aligned = aligned_layers_at(step, cfg.distill, cfg.model.num_layers, max_steps, tm.frozen)
    result = StepResult(lr=lr_at(step, cfg.train), tau=tau_at(step, cfg.distill, max_steps),
                        frozen_layers=tm.frozen, aligned_layers=aligned)
    tm.set_lr(result.lr)
    if tm.pipe_ctx is not None:
        _pipeline_batch(tm, micro_batches, step, aligned, result)
    else:
        _micro_batches(tm, micro_batches, step, aligned, result)
    if result.skipped:
        return result
    # 5. EMA update of the teacher, from the student after this step (frozen parameters copied)
    tm.teacher.update(tm.student_gpt_params(), result.tau, tm.frozen_indices())
    # 6. freezing milestones: the step count after this step decides
    tm.freeze(frozen_layers_at(step + 1, cfg.distill, cfg.model.num_layers, max_steps))
    return result


def _micro_batches(tm: SDTrainModule, micro_batches: list[dict[str, torch.Tensor]], step: int, aligned: list[int],
                   result: StepResult) -> None:
    sums = {"total": 0.0, "lm": 0.0, "kd": 0.0, "align": 0.0}
    dropped_any: set[int] = set()
    for micro, batch in enumerate(micro_batches):
        terms, dropped = sdt_losses(tm, batch, step, micro, aligned)
        if not _all_finite(terms["total"]):
            if micro > 0:
                # Earlier micro-batches already accumulated gradients inside DeepSpeed, and its accumulation
                # counter has moved: there is no clean way back, so stop rather than corrupt the step.
                raise RuntimeError(f"non-finite loss in micro-batch {micro} of step {step}; the step cannot be "
                                   f"skipped after gradient accumulation began. Resume from the last checkpoint.")
            result.skipped = True
            break
        # 4. backward; the engine applies AdamW (with clipping) at the accumulation boundary
        tm.engine.backward(terms["total"])
        if micro == len(micro_batches) - 1 and not _zero0_grads_finite(tm):
            _step_without_update(tm.engine)
            result.skipped = True
        else:
            tm.engine.step()
        # one host transfer for the logged values (after the step has been queued)
        *values, tokens = torch.stack([*(terms[k].detach().float() for k in sums),
                                       batch["loss_mask"].sum().float()]).tolist()
        for k, v in zip(sums, values):
            sums[k] += v / len(micro_batches)
        dropped_any |= dropped
        result.tokens += int(tokens)
    result.loss, result.loss_lm, result.loss_kd, result.loss_align = (
        sums["total"], sums["lm"], sums["kd"], sums["align"])
    result.dropped_layers = sorted(dropped_any)
    if not result.skipped and not tm.engine.was_step_applied():
        # a finite loss with a non-finite gradient norm: DeepSpeed (ZeRO-1/2, or fp16) left weights and optimizer
        # untouched, on every rank alike (the norm is global), so teacher and schedules must not move either
        result.skipped = True


def _pipeline_batch(tm: SDTrainModule, micro_batches: list[dict[str, torch.Tensor]], step: int,
                    aligned: list[int], result: StepResult) -> None:
    """Steps 1-4 under pipeline parallelism: the engine's schedule runs student and teacher forward
    stage by stage (alignment terms per stage, KD on the last), backward and the optimizer step."""
    ctx = tm.pipe_ctx
    ctx.step, ctx.no_grad_prefix, ctx.aligned, ctx.training = step, tm.no_grad_prefix, frozenset(aligned), True
    ctx.terms.clear()
    data = iter([batch_to_pipe(b, m) for m, b in enumerate(micro_batches)])
    with tm.teacher.materialized():
        tm.engine.train_batch(data_iter=data)
    # the loss terms exist on the last stage: share them with the other stages of this pipeline
    terms = torch.tensor([[t[k] for k in ("total", "lm", "kd", "align")] for t in ctx.terms] or [[0.0] * 4],
                         dtype=torch.float64).mean(0)
    dist.broadcast(terms, src=ps.get_pipeline_model_parallel_last_rank(),
                   group=ps.get_pipeline_model_parallel_group())
    result.loss, result.loss_lm, result.loss_kd, result.loss_align = terms.tolist()
    # Known limit: the schedule has already stepped, so a non-finite loss cannot be skipped under PP.
    result.dropped_layers = sorted(set().union(*(sample_dropped(tm.drop_probs, tm.cfg.train.seed, step, m)
                                                 for m in range(len(micro_batches)))))
    result.tokens = int(sum(b["loss_mask"].sum().item() for b in micro_batches))
