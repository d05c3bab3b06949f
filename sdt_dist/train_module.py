"""SDTrainModule: owns the student (+ predictors) inside a DeepSpeed engine, the EMA teacher and the
freezing state. The trainer drives it; `train_step.py` is the algorithm written against it.

`train_batch` and `eval_loss` are the same calls in every layout: without pipeline parallelism the student
and teacher run here one micro-batch at a time; with it, DeepSpeed's pipeline engine runs them stage by
stage (`parallel/pipeline.py`). Either way the total loss comes from `losses.combine_losses`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from sdt_dist.config import Config
from sdt_dist.distill import losses
from sdt_dist.distill.freezing import frozen_parameters
from sdt_dist.distill.fused_lm_kd import fused_lm_loss, lm_kd_losses
from sdt_dist.distill.layerdrop import layer_probs
from sdt_dist.distill.predictor import build_predictors, predictor_spec
from sdt_dist.distill.schedules import layer_map
from sdt_dist.distill.shared_trunk import shared_layers, trunk_sharing
from sdt_dist.distill.step_plan import StepPlan
from sdt_dist.distill.teacher import EmaTeacher, gathered_per_step
from sdt_dist.export import gather_full_state
from sdt_dist.init_from import load_initial_weights
from sdt_dist.model import GPTModel, student_layer_specs, teacher_layer_specs, transformer_config
from sdt_dist.model.student import Student
from sdt_dist.parallel.dims import ParallelDims, device
from sdt_dist.parallel.engine import (
    build_ds_config,
    compute_dtype,
    initialize_engine,
    model_init_context,
    param_groups,
)
from sdt_dist.parallel.finite_step import all_finite, guard_optimizer_step
from sdt_dist.parallel.optimizer_state import restore_optimizer_state, snapshot_optimizer_state
from sdt_dist.parallel.pipeline import Pipeline, StageSettings, stage_pieces, stage_units
from sdt_dist.parallel.sequence_parallel import (
    allreduce_sequence_parallel_grads,
    mark_sequence_parallel,
    place_megatron_buffers_on_accelerator,
)


@dataclass
class BatchResult:
    """One optimizer step's batch: loss terms averaged over its micro-batches (this rank's), the tokens that
    counted, the layers LayerDrop skipped in any micro-batch, and whether the update was skipped."""

    loss: float = 0.0
    loss_lm: float = 0.0
    loss_kd: float = 0.0
    loss_align: float = 0.0
    tokens: int = 0
    dropped_layers: list[int] = field(default_factory=list)
    skipped: bool = False


class SDTrainModule:
    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        self._trunk_key: tuple[int, int] | None = None  # what `_trunk` was worked out for
        self._trunk = 0
        m, d = cfg.model, cfg.distill
        if cfg.parallel.sequence_parallel:
            place_megatron_buffers_on_accelerator()  # megatron-core allocates SP buffers on CUDA by default
        self.ds_config = build_ds_config(cfg, dims.dp)
        self.dtype = compute_dtype(self.ds_config)
        tconf = transformer_config(m, cfg.parallel, self.dtype)
        self.drop_probs = layer_probs(d.layerdrop_p, m.num_layers, d.layerdrop_schedule)
        self.layer_map = layer_map(d.align_map, m.num_layers, d.teacher_layers or m.num_layers)
        # Same seed on every rank: identical master weights, split by TP, partitioned by ZeRO, and under PP kept
        # for this stage's layers only (the others are built and dropped one at a time: `model/stage_init.py`)
        torch.manual_seed(cfg.train.seed)
        kept = stage_units(m.num_layers, dims.pp, dims.pp_rank) if dims.pp > 1 else None
        with model_init_context(self.ds_config, dims):
            gpt = GPTModel(tconf, student_layer_specs(self.drop_probs, m.recompute, m.rope_base), m.vocab_size,
                           m.tie_embeddings, kept)
            predictors = build_predictors(predictor_spec(), m.num_layers, m.hidden_size, m.init_std, kept)
        if cfg.train.init_from is not None:  # before the engine copies the weights and the teacher takes them
            load_initial_weights(gpt, cfg.train.init_from, m, dims.tp_split)
        if cfg.parallel.sequence_parallel:
            # predictors see this rank's slice of the sequence; their gradients, like the LayerNorms' and
            # the row-parallel biases', are summed over the TP group
            mark_sequence_parallel(predictors)
            allreduce_sequence_parallel_grads(gpt, dims.tp_group)
            allreduce_sequence_parallel_grads(predictors, dims.tp_group)
        # without alignment (kappa is empty) the predictors can get no gradient: no optimizer state, no update
        # (AdamW's weight decay alone would move them)
        predictors.requires_grad_(d.lambda_sd > 0)
        # built like the student in every layout (its values are the student's, from EmaTeacher), so that the
        # random state after init, and with it dropout, is the same at any PP size
        teacher_gpt = GPTModel(tconf, teacher_layer_specs(m.num_layers, m.rope_base), m.vocab_size, m.tie_embeddings,
                               kept).to(device())
        self.gpt = gpt  # under PP, only this stage's parameters hold weights
        self.predictors = predictors
        self.teacher_gpt = teacher_gpt
        self.frozen = 0
        self._frozen_indices: tuple[int, frozenset[int]] = (0, frozenset())
        dp_group = dims.dp_group if dims.dp > 1 else None
        if dims.pp == 1:
            self.pipeline = None
            self.student = Student(gpt, predictors)
            self.engine = self._build_engine()
            self.ema_source: torch.nn.Module = gpt
            self.teacher = EmaTeacher(teacher_gpt, gpt, dp_group, self.dtype)
        else:
            self.pipeline = Pipeline(StageSettings(
                weights=d, temperature=d.temperature, align_reduce=d.align_reduce, dtype=self.dtype,
                tp_group=dims.tp_split,
                sp_group=dims.tp_group if cfg.parallel.sequence_parallel else None))
            self.student = self.pipeline.module(gpt, predictors, teacher_gpt, dims)
            self.engine = self._build_engine()
            self.ema_source, teacher_pieces = stage_pieces(self.student)
            self.teacher = EmaTeacher(teacher_pieces, self.ema_source, dp_group, self.dtype)
        self._ema_params = tuple(self.ema_source.parameters())

    def _build_engine(self):
        groups = param_groups(list(self.student.named_parameters()), self.cfg.train.weight_decay)
        t = self.cfg.train
        engine = initialize_engine(self.student, groups, self.ds_config, t.lr, tuple(t.betas), self.dims,
                                   t.optimizer_impl)
        # DeepSpeed checks the gradient norm itself except under ZeRO-0; under PP the loss is known only inside
        # the engine's schedule, on the last stage: check both before the optimizer step
        guard_optimizer_step(engine, check_grads=engine.zero_optimization_stage() == 0,
                             losses_finite=None if self.pipeline is None else self.pipeline.losses_finite)
        return engine

    def _rebuild_engine(self) -> None:
        """A new engine (and optimizer) over the parameters that now require grad, at the old one's learning
        rates: how freezing and `train_predictors` change what the optimizer holds."""
        lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        self.engine.destroy()
        self.engine = self._build_engine()
        for group, lr in zip(self.engine.optimizer.param_groups, lrs):
            group["lr"] = lr

    def student_gpt_params(self) -> list[torch.nn.Parameter]:
        """The student parameters the EMA teacher averages (this stage's, under PP), in its order (listed once:
        freezing and engine rebuilds change their flags, never the parameters)."""
        return list(self._ema_params)

    def named_student_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This stage's student and predictor parameters under names no layout changes (`gpt.<GPTModel name>`,
        `predictors.<name>`, as in `Student`)."""
        local = {id(p) for p in self.student.parameters()}
        named = [(f"gpt.{n}", p) for n, p in self.gpt.named_parameters()]
        named += [(f"predictors.{n}", p) for n, p in self.predictors.named_parameters()]
        return [(n, p) for n, p in named if id(p) in local]

    @property
    def no_grad_prefix(self) -> int:
        """Frozen layers that may run without autograd: all of them when the embedding below is frozen too;
        none when it trains (its gradient flows back through the frozen layers, whose weights get none)."""
        return self.frozen if self.cfg.distill.freeze_embedding else 0

    def frozen_indices(self) -> frozenset[int]:
        """Indices (in `student_gpt_params` order) of frozen parameters: the teacher copies them. Found again only
        when the frozen count moved (the EMA update asks every step)."""
        if self._frozen_indices[0] != self.frozen:
            ids = {id(p) for p in frozen_parameters(self.gpt, self.frozen, self.cfg.distill.freeze_embedding)}
            found = frozenset(i for i, p in enumerate(self._ema_params) if id(p) in ids)
            self._frozen_indices = (self.frozen, found)
        return self._frozen_indices[1]

    def teacher_gather(self, accumulation_steps: int) -> str:
        """How much of the teacher its forward holds whole at once, and over DP > 1 how much it all-gathers in a
        step (for the log)."""
        whole = self.teacher.full_numel()
        per_step = 1 if gathered_per_step(self.cfg) else accumulation_steps
        moved = "" if self.dims.dp == 1 else (
            f"; all-gathers {whole * per_step * self.dtype.itemsize / 2**30:.2f} GiB a step over {self.dims.dp} "
            f"data-parallel ranks")
        if self.pipeline is not None:
            return f"{whole:,} values at once (the whole stage, for each batch, {self.dtype}){moved}"
        if per_step == 1:
            return f"{whole:,} values at once (the whole model, once per step, {self.dtype}){moved}"
        return (f"{self.teacher.largest_unit_numel():,} values at once (one module at a time, for each micro-batch, "
                f"{self.dtype}){moved}")

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full student and teacher weights under GPTModel names (collective; complete on global rank 0)."""
        local_ids = {id(p) for p in self.student_gpt_params()}
        student = [(n, p) for n, p in self.gpt.named_parameters() if id(p) in local_ids]
        teacher_values = dict(zip((id(p) for p in self.teacher.params), self.teacher.full_parameters()))
        teacher = [(n, p) for n, p in self.teacher_gpt.named_parameters() if id(p) in teacher_values]
        tp_group = self.dims.tp_split
        pp_group = self.dims.pp_split
        return (gather_full_state(student, None, tp_group, pp_group),
                gather_full_state(teacher, [teacher_values[id(p)] for _, p in teacher], tp_group, pp_group))

    def plan(self, step: int, aligned: list[int]) -> StepPlan:
        """The decisions of training step `step` (the same on every rank)."""
        shared = self._shared_trunk() if trunk_sharing(self.cfg) else 0
        return StepPlan(step=step, training=True, aligned=frozenset(aligned), no_grad_prefix=self.no_grad_prefix,
                        shared_trunk=shared, drop_probs=tuple(self.drop_probs), seed=self.cfg.train.seed)

    def _shared_trunk(self) -> int:
        # changes only at a milestone's copy into the teacher or a checkpoint load: not worked out every step
        key = (self.no_grad_prefix, self.teacher.copied_version)
        if self._trunk_key != key:
            self._trunk_key = key
            self._trunk = shared_layers(self.gpt, key[0], self.student_gpt_params(), self.teacher.copied)
        return self._trunk

    def train_batch(self, micro_batches: list[dict[str, torch.Tensor]], plan: StepPlan) -> BatchResult:
        """Steps 1-4 of Algorithm 1 for one optimizer step: per micro-batch the student forward with LayerDrop,
        the teacher forward, the losses and backward; the optimizer steps at the accumulation boundary."""
        d = self.cfg.distill
        # the teacher gathered once for all the step's micro-batches, where the step runs it
        whole = gathered_per_step(self.cfg) and (self.pipeline is not None or d.lambda_kd > 0 or bool(plan.aligned))
        with self.teacher.materialized() if whole else contextlib.nullcontext():
            if self.pipeline is None:
                return self._micro_batches(micro_batches, plan)
            terms = self.pipeline.train_batch(self.engine, micro_batches, plan, self.dims)
        loss, lm, kd, align = terms.tolist()
        return BatchResult(loss=loss, loss_lm=lm, loss_kd=kd, loss_align=align,
                           tokens=int(sum(b["loss_mask"].sum().item() for b in micro_batches)),
                           dropped_layers=sorted(set().union(*(plan.dropped(m) for m in range(len(micro_batches))))),
                           skipped=not self.engine.was_step_applied())

    def _micro_batch_losses(self, batch: dict[str, torch.Tensor], plan: StepPlan,
                            micro: int) -> dict[str, torch.Tensor]:
        """Steps 1-3 for one micro-batch: the loss terms, as tensors."""
        d = self.cfg.distill
        tp_group = self.dims.tp_split
        tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        # 1. student forward with LayerDrop (the plan's skips are the same on every rank: ZeRO-3 gathers
        # parameters with DP collectives, so all ranks must run the same layers); predictors q_l on the
        # aligned layers that ran; and the frozen trunk's output states the teacher shares
        logits, predictions, trunk = self.engine(tokens, skip=plan.dropped(micro), frozen_prefix=plan.no_grad_prefix,
                                                 aligned=tuple(sorted(plan.aligned)), trunk=plan.shared(micro))
        terms: dict[str, torch.Tensor] = {}
        # 2. teacher forward (no grad, no dropout, no LayerDrop), from the shared trunk up
        if d.lambda_kd > 0 or predictions:
            teacher = self.teacher(tokens, trunk=trunk)
            # 3. LM and KD in one pass over the logits (LM + lambda_KD * KD, and each apart), then the alignment
            lm_kd = lm_kd_losses(logits, teacher.logits, labels, mask, d.temperature, d.lambda_kd, tp_group)
            terms["lm"], terms["kd"] = lm_kd.lm, lm_kd.kd
            sp_group = tp_group if self.cfg.parallel.sequence_parallel else None
            terms["align"] = losses.align_loss(predictions, teacher.hidden, self.layer_map, mask, sp_group,
                                               reduce=d.align_reduce)
            weighted = lm_kd.weighted
        else:
            weighted = terms["lm"] = fused_lm_loss(logits, labels, mask, tp_group)  # the same pass, LM alone
            terms["kd"] = terms["align"] = torch.zeros((), device=logits.device)
        terms["total"] = losses.combine_losses(weighted, terms["align"], d)
        return terms

    def _micro_batches(self, micro_batches: list[dict[str, torch.Tensor]], plan: StepPlan) -> BatchResult:
        out = BatchResult()
        sums = {"total": 0.0, "lm": 0.0, "kd": 0.0, "align": 0.0}
        dropped_any: set[int] = set()
        for micro, batch in enumerate(micro_batches):
            terms = self._micro_batch_losses(batch, plan, micro)
            if not all_finite(terms["total"]):
                if micro > 0:
                    # Earlier micro-batches already accumulated gradients inside DeepSpeed, and its accumulation
                    # counter has moved: there is no clean way back, so stop rather than corrupt the step.
                    raise RuntimeError(f"non-finite loss in micro-batch {micro} of step {plan.step}; the step "
                                       f"cannot be skipped after gradient accumulation began. Resume from the last "
                                       f"checkpoint.")
                out.skipped = True
                break
            # 4. backward; the engine applies AdamW (with clipping) at the accumulation boundary
            self.engine.backward(terms["total"])
            self.engine.step()
            # one host transfer for the logged values (after the step has been queued)
            *values, tokens = torch.stack([*(terms[k].detach().float() for k in sums),
                                           batch["loss_mask"].sum().float()]).tolist()
            for k, v in zip(sums, values):
                sums[k] += v / len(micro_batches)
            dropped_any |= plan.dropped(micro)
            out.tokens += int(tokens)
        out.loss, out.loss_lm, out.loss_kd, out.loss_align = sums["total"], sums["lm"], sums["kd"], sums["align"]
        out.dropped_layers = sorted(dropped_any)
        if not out.skipped and not self.engine.was_step_applied():
            # a finite loss with a non-finite gradient: DeepSpeed (ZeRO-1/2/3, fp16) or our check (ZeRO-0) left
            # weights and optimizer untouched, on every rank alike, so teacher and schedules must not move either
            out.skipped = True
        return out

    @torch.no_grad()
    def eval_loss(self, batch: dict[str, torch.Tensor]) -> float:
        """The student's LM loss on one batch (no LayerDrop, no teacher), the same on every rank of a TP group
        and a pipeline."""
        if self.pipeline is not None:
            return self.pipeline.eval_loss(self.engine, batch)
        logits = self.engine(batch["tokens"]).logits
        return losses.lm_loss(logits, batch["labels"], batch["loss_mask"],
                              self.dims.tp_split).item()

    @property
    def predictors_trained(self) -> bool:
        """Whether the predictors are in the optimizer (not in a run without alignment, lambda_sd = 0)."""
        return any(p.requires_grad for p in self.predictors.parameters())

    def train_predictors(self, trained: bool) -> None:
        """Put the predictors in the optimizer or take them out (rebuilding it), so that its parameter groups
        match a checkpoint's: one of a run without alignment written before they left it still holds them."""
        if trained == self.predictors_trained:
            return
        self.predictors.requires_grad_(trained)
        self._rebuild_engine()

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def freeze(self, num_frozen: int, carry_state: bool = True) -> None:
        """Freeze layers 1..num_frozen (and the embedding, with distill.freeze_embedding) for good: rebuild the
        optimizer without them.

        `carry_state=False` is for a resume, where the checkpoint restores the optimizer anyway."""
        if num_frozen <= self.frozen:
            return
        # under PP, some live on other stages: harmless
        newly = frozen_parameters(self.gpt, num_frozen, self.cfg.distill.freeze_embedding)
        newly_ids = {id(p) for p in newly}
        kept = [p for p in self.student.parameters() if p.requires_grad and id(p) not in newly_ids]
        snap = snapshot_optimizer_state(self.engine, kept) if carry_state else None
        for p in newly:
            p.requires_grad_(False)
            p.grad = None
        self._rebuild_engine()
        if snap is not None:
            restore_optimizer_state(self.engine, kept, snap)
        self.frozen = num_frozen
