"""Pipeline parallelism through DeepSpeed's pipeline engine, with megatron-core layers in the stages.

Between stages flows one tuple:
  (h_student, h_teacher_bits, align_acc, loss_mask_bits, micro_id)
The student state carries gradients; the teacher state crosses as an integer view of its bytes (the
engine expects a gradient for every floating tensor it sends; the teacher has none); `align_acc`
accumulates this micro-batch's alignment terms stage by stage, so each stage aligns its own layers and
the gradient of the sum flows back through the engine's normal exchange. KD and LM are computed in
the last stage's loss function, and combined there by `losses.combine_losses`, as without PP. The teacher's
layers live beside the student's in each stage, unregistered (they are not trained and not in the
optimizer); `EmaTeacher` holds this stage's shards. Every stage reads the step's decisions (LayerDrop,
aligned layers, frozen prefix) from the immutable `StepPlan` that `Pipeline` holds for the batch in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sdt_dist.distill import losses
from sdt_dist.distill.fused_lm_kd import lm_kd_losses
from sdt_dist.distill.step_plan import StepPlan
from sdt_dist.model.gpt import GPTModel, embed_tokens
from sdt_dist.parallel.dims import ParallelDims, device

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# DeepSpeed balances the decoder layers over the stages; the embedding goes to the first, the head to the last.
PARTITION = "type:DecoderPipe"


def stage_units(num_layers: int, pp: int, stage: int) -> range:
    """The pipeline layers (0 embedding, 1..L decoder layers, L + 1 head) of stage `stage`, as DeepSpeed's
    PipelineModule partitions them (`PARTITION`): the units whose weights the stage builds (`stage_init.py`)."""
    from deepspeed.runtime.utils import partition_balanced

    parts = partition_balanced(weights=[0] + [1] * num_layers + [0], num_parts=pp)
    return range(int(parts[stage]), int(parts[stage + 1]))


def to_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_BITS[t.dtype])


def from_bits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype)


@dataclass(frozen=True)
class StageSettings:
    """What the stages need for the whole run."""

    weights: losses.LossWeights  # lambda_kd, lambda_sd of the total loss
    temperature: float
    align_reduce: str
    dtype: torch.dtype
    tp_group: torch.distributed.ProcessGroup | None
    sp_group: torch.distributed.ProcessGroup | None  # the TP group when hidden states are sequence-split


class Pipeline:
    """The stages' window on the batch the engine's schedule is running: the `StepPlan` they read (set once
    per batch, by `train_batch` and `eval_loss`) and the loss terms the last stage computes for each
    micro-batch (read back by `train_batch`). Only this class writes either."""

    def __init__(self, settings: StageSettings) -> None:
        self.settings = settings
        self.plan = StepPlan.evaluation()
        self._terms: list[torch.Tensor] = []  # [total, LM, KD, alignment] per micro-batch, on the last stage

    def module(self, student: GPTModel, predictors: torch.nn.ModuleDict, teacher: GPTModel,
               dims: ParallelDims) -> torch.nn.Module:
        """DeepSpeed's PipelineModule over megatron's layout: its topology's rank order agrees with
        megatron-core's groups (pipe outermost, then data, then tensor)."""
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
        layers = [EmbedPipe(student, teacher, self),
                  *[DecoderPipe(n, student, predictors[str(n)], teacher, self)
                    for n in range(1, student.num_layers + 1)],
                  HeadPipe(student, teacher, self)]
        pipe = PipelineModule(layers=layers, topology=topology, loss_fn=self._loss,
                              partition_method=PARTITION)
        ran = range(int(pipe.parts[pipe.stage_id]), int(pipe.parts[pipe.stage_id + 1]))
        built = stage_units(student.num_layers, dims.pp, dims.pp_rank)
        if ran != built:  # a stage without the weights of its layers would train garbage
            raise RuntimeError(f"DeepSpeed gave this stage layers {ran.start}..{ran.stop - 1}; the model was built "
                               f"with the weights of {built.start}..{built.stop - 1}")
        return pipe

    def _loss(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Step 3 on the last stage: LM and KD here, the alignment terms summed stage by stage on the way."""
        logits, t_logits, acc = outputs
        target, mask = labels
        s = self.settings
        if not self.plan.training:
            lm = losses.lm_loss(logits, target, mask, s.tp_group)
            zero = torch.zeros_like(lm)
            self._terms.append(torch.stack([lm, lm, zero, zero]).detach())
            return lm
        # LM and KD in one pass over the logits, as without PP
        lm_kd = lm_kd_losses(logits, t_logits, target, mask, s.temperature, s.weights.lambda_kd, s.tp_group)
        align = acc.sum()
        total = losses.combine_losses(lm_kd.weighted, align, s.weights)
        self._terms.append(torch.stack([total, lm_kd.lm, lm_kd.kd, align]).detach())
        return total

    def train_batch(self, engine, micro_batches: list[dict[str, torch.Tensor]], plan: StepPlan,
                    dims: ParallelDims) -> torch.Tensor:
        """Steps 1-4 for all micro-batches (the engine's schedule: forward and backward stage by stage, the
        optimizer step, which `finite_step.guard_optimizer_step` skips on every rank if a loss term is not
        finite); the mean [total, LM, KD, alignment] over micro-batches, on every stage."""
        self.plan, self._terms = plan, []
        engine.train_batch(data_iter=iter([batch_to_pipe(b, m) for m, b in enumerate(micro_batches)]))
        # the terms exist on the last stage: share them with the other stages of this pipeline
        terms = (torch.stack(self._terms).double().mean(0) if self._terms
                 else torch.zeros(4, dtype=torch.float64, device=device()))
        dist.broadcast(terms, src=dims.pp_last_rank, group=dims.pp_group)
        return terms

    def eval_loss(self, engine, batch: dict[str, torch.Tensor]) -> float:
        """The LM loss of one batch, student only (the schedule brings it back to every stage)."""
        self.plan, self._terms = StepPlan.evaluation(), []
        return engine.eval_batch(iter([batch_to_pipe(batch, 0)]), num_micro_batches=1).item()

    def losses_finite(self) -> bool:
        """Whether every loss term this rank computed in the batch in flight is finite (no communication;
        true on stages other than the last, which compute none)."""
        return all(bool(torch.isfinite(t).all()) for t in self._terms)


def _with_grad(t: torch.Tensor) -> torch.Tensor:
    # A fully frozen stage produces activations without autograd; the engine still needs a leaf to
    # send gradients back to (they stop there).
    return t if t.requires_grad else t.detach().requires_grad_(True)


class EmbedPipe(torch.nn.Module):
    def __init__(self, student: GPTModel, teacher: GPTModel, pipeline: Pipeline) -> None:
        super().__init__()
        self.embedding = student.embedding
        self.embedding_dropout = student.embedding_dropout
        self._teacher = [teacher]  # a list: not registered, not trained
        self.pipeline = pipeline  # not a Module: read, never registered

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, mask_bits, micro = inputs
        plan = self.pipeline.plan
        # 1. student forward (without autograd when the embedding is frozen)
        with torch.set_grad_enabled(torch.is_grad_enabled() and plan.no_grad_prefix == 0):
            h = embed_tokens(self.embedding, self.embedding_dropout, tokens)
        # 2. teacher forward
        if plan.training:
            with torch.no_grad():
                h_t = self._teacher[0].embed(tokens)
        else:
            h_t = torch.zeros_like(h)
        acc = torch.zeros(1, dtype=torch.float32, device=h.device, requires_grad=True)
        return _with_grad(h), to_bits(h_t), acc, mask_bits, micro


class DecoderPipe(torch.nn.Module):
    def __init__(self, number: int, student: GPTModel, predictor: torch.nn.Module, teacher: GPTModel,
                 pipeline: Pipeline) -> None:
        super().__init__()
        self.number = number
        self.layer = student.layers[number - 1]
        self.predictor = predictor
        self._teacher = [teacher.layers[number - 1]]  # a list: not registered, not trained
        self.pipeline = pipeline  # not a Module: read, never registered

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, h_t_bits, acc, mask_bits, micro = inputs
        plan, s = self.pipeline.plan, self.pipeline.settings
        dropped = plan.dropped(int(micro.item()))
        skip = self.number in dropped
        # 1. student forward with LayerDrop
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.number > plan.no_grad_prefix):
            h, _ = self.layer(h, attention_mask=None, skip=skip)
        if plan.training:
            # 2. teacher forward
            with torch.no_grad():
                h_t, _ = self._teacher[0](from_bits(h_t_bits, s.dtype), attention_mask=None)
            h_t_bits = to_bits(h_t)
            # 3. this layer's alignment term
            if self.number in plan.aligned and not skip:
                mask = mask_bits.to(torch.float32)
                # the mean is over the aligned layers that ran on every stage, not this stage's
                ran = len(plan.aligned - dropped)
                acc = acc + losses.align_loss({self.number: self.predictor(h)}, {self.number: h_t},
                                              {self.number: self.number}, mask, s.sp_group,
                                              reduce=s.align_reduce, num_aligned=ran)
        return _with_grad(h), h_t_bits, _with_grad(acc), mask_bits, micro


class HeadPipe(torch.nn.Module):
    def __init__(self, student: GPTModel, teacher: GPTModel, pipeline: Pipeline) -> None:
        super().__init__()
        if student.tie_embeddings:
            raise ValueError("pipeline parallelism needs model.tie_embeddings=false (the embedding and the head "
                             "live on different stages)")
        self.final_norm = student.final_norm
        self.output_layer = student.output_layer
        self._teacher = [teacher]
        self.pipeline = pipeline  # not a Module: read, never registered

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, h_t_bits, acc, mask_bits, micro = inputs
        logits = self.output_layer(self.final_norm(h))[0].transpose(0, 1)
        if self.pipeline.plan.training:
            with torch.no_grad():
                t_logits = self._teacher[0].head(from_bits(h_t_bits, self.pipeline.settings.dtype))
        else:
            t_logits = torch.zeros_like(logits)
        return logits, t_logits, acc


def stage_pieces(pipe_module) -> tuple[torch.nn.ModuleList, torch.nn.ModuleList]:
    """(student pieces, teacher pieces) held by this stage, parameters in matching order."""
    student, teacher = torch.nn.ModuleList(), torch.nn.ModuleList()
    for layer in pipe_module.forward_funcs:
        if isinstance(layer, EmbedPipe):
            student.append(layer.embedding)
            teacher.append(layer._teacher[0].embedding)
        elif isinstance(layer, DecoderPipe):
            student.append(layer.layer)
            teacher.append(layer._teacher[0])
        elif isinstance(layer, HeadPipe):
            student.extend([layer.final_norm, layer.output_layer])
            teacher.extend([layer._teacher[0].final_norm, layer._teacher[0].output_layer])
    return student, teacher


def batch_to_pipe(batch: dict[str, torch.Tensor], micro: int) -> tuple[tuple, tuple]:
    """(inputs of the first stage, labels of the last) for the engine's data iterator."""
    mask_bits = batch["loss_mask"].to(torch.int8)
    inputs = (batch["tokens"], mask_bits, torch.tensor([micro]))
    return inputs, (batch["labels"], batch["loss_mask"])
