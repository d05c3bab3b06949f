"""Pipeline parallelism through DeepSpeed's pipeline engine, with megatron-core layers in the stages.

Between stages flows one tuple:
  (h_student, h_teacher_bits, align_acc, loss_mask_bits, micro_id)
The student state carries gradients; the teacher state crosses as an integer view of its bytes (the
engine expects a gradient for every floating tensor it sends; the teacher has none); `align_acc`
accumulates this micro-batch's alignment terms stage by stage, so each stage aligns its own layers and
the gradient of the sum flows back through the engine's normal exchange. KD and LM are computed in
the last stage's `loss_fn`. The teacher's layers live beside the student's in each stage, unregistered
(they are not trained and not in the optimizer); `EmaTeacher` holds this stage's shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdt_dist.distill import losses
from sdt_dist.distill.layerdrop import sample_dropped
from sdt_dist.model.gpt import GPTModel, embed_tokens

_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def to_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_BITS[t.dtype])


def from_bits(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype)


@dataclass
class PipeContext:
    """What every stage needs to know about the current step (the same on all ranks)."""

    seed: int
    drop_probs: list[float]
    temperature: float
    lambda_kd: float
    lambda_sd: float
    align_reduce: str
    dtype: torch.dtype
    tp_group: torch.distributed.ProcessGroup | None
    sp_group: torch.distributed.ProcessGroup | None  # the TP group when hidden states are sequence-split
    step: int = 0
    no_grad_prefix: int = 0  # the embedding and layers 1..k run without autograd (frozen, embedding included)
    aligned: frozenset[int] = frozenset()
    training: bool = True  # False for validation: no LayerDrop, no teacher forward, LM loss only
    terms: list[dict[str, float]] = field(default_factory=list)  # per micro-batch, filled on the last stage

    def dropped(self, micro: torch.Tensor) -> frozenset[int]:
        if not self.training:
            return frozenset()
        return sample_dropped(self.drop_probs, self.seed, self.step, int(micro.item()))


def _with_grad(t: torch.Tensor) -> torch.Tensor:
    # A fully frozen stage produces activations without autograd; the engine still needs a leaf to
    # send gradients back to (they stop there).
    return t if t.requires_grad else t.detach().requires_grad_(True)


class EmbedPipe(torch.nn.Module):
    def __init__(self, student: GPTModel, teacher: GPTModel, ctx: PipeContext) -> None:
        super().__init__()
        self.embedding = student.embedding
        self.embedding_dropout = student.embedding_dropout
        self._teacher = [teacher]  # a list: not registered, not trained
        self.ctx = ctx

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        tokens, mask_bits, micro = inputs
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.ctx.no_grad_prefix == 0):
            h = embed_tokens(self.embedding, self.embedding_dropout, tokens)
        if self.ctx.training:
            with torch.no_grad():
                h_t = self._teacher[0].embed(tokens)
        else:
            h_t = torch.zeros_like(h)
        acc = torch.zeros(1, dtype=torch.float32, device=h.device, requires_grad=True)
        return _with_grad(h), to_bits(h_t), acc, mask_bits, micro


class DecoderPipe(torch.nn.Module):
    def __init__(self, number: int, student: GPTModel, predictor: torch.nn.Module, teacher: GPTModel,
                 ctx: PipeContext) -> None:
        super().__init__()
        self.number = number
        self.layer = student.layers[number - 1]
        self.predictor = predictor
        self._teacher = [teacher.layers[number - 1], teacher.rope]
        self.rope = student.rope
        self.ctx = ctx

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, h_t_bits, acc, mask_bits, micro = inputs
        ctx = self.ctx
        rotary = self.rope(mask_bits.size(1), h.device)  # the whole sequence, also when h is a slice of it
        skip = self.number in ctx.dropped(micro)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.number > ctx.no_grad_prefix):
            h, _ = self.layer(h, attention_mask=None, rotary_pos_emb=rotary, skip=skip)
        if ctx.training:
            with torch.no_grad():
                h_t, _ = self._teacher[0](from_bits(h_t_bits, ctx.dtype), attention_mask=None, rotary_pos_emb=rotary)
            h_t_bits = to_bits(h_t)
            if self.number in ctx.aligned and not skip:
                mask = mask_bits.to(torch.float32)
                # the mean is over the aligned layers that ran on every stage, not this stage's
                ran = len(ctx.aligned - ctx.dropped(micro))
                acc = acc + losses.align_loss({self.number: self.predictor(h)}, {self.number: h_t},
                                              {self.number: self.number}, mask, ctx.sp_group,
                                              reduce=ctx.align_reduce, num_aligned=ran)
        return _with_grad(h), h_t_bits, _with_grad(acc), mask_bits, micro


class HeadPipe(torch.nn.Module):
    def __init__(self, student: GPTModel, teacher: GPTModel, ctx: PipeContext) -> None:
        super().__init__()
        if student.tie_embeddings:
            raise ValueError("pipeline parallelism needs model.tie_embeddings=false (the embedding and the head "
                             "live on different stages)")
        self.final_norm = student.final_norm
        self.output_layer = student.output_layer
        self._teacher = [teacher]
        self.ctx = ctx

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h, h_t_bits, acc, mask_bits, micro = inputs
        logits = self.output_layer(self.final_norm(h))[0].transpose(0, 1)
        if self.ctx.training:
            with torch.no_grad():
                t_logits = self._teacher[0].head(from_bits(h_t_bits, self.ctx.dtype))
        else:
            t_logits = torch.zeros_like(logits)
        return logits, t_logits, acc


def make_loss_fn(ctx: PipeContext):
    def loss_fn(outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits, t_logits, acc = outputs
        target, mask = labels
        lm = losses.lm_loss(logits, target, mask, ctx.tp_group)
        if not ctx.training:
            ctx.terms.append({"lm": lm.item(), "kd": 0.0, "align": 0.0, "total": lm.item()})
            return lm
        kd = losses.kd_loss(logits, t_logits, mask, ctx.temperature, ctx.tp_group)
        align = acc.sum()
        total = lm + ctx.lambda_kd * kd + ctx.lambda_sd * align
        ctx.terms.append({"lm": lm.item(), "kd": kd.item(), "align": align.item(), "total": total.item()})
        return total

    return loss_fn


def pipe_layers(student: GPTModel, predictors: torch.nn.ModuleDict, teacher: GPTModel,
                ctx: PipeContext) -> list[torch.nn.Module]:
    return [EmbedPipe(student, teacher, ctx),
            *[DecoderPipe(n, student, predictors[str(n)], teacher, ctx) for n in range(1, student.num_layers + 1)],
            HeadPipe(student, teacher, ctx)]


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


def release_other_stages(module: torch.nn.Module, stage: torch.nn.Module) -> None:
    """Free the weights of `module`'s parameters that are not in `stage`: every rank builds the whole model
    (the same initial weights at any PP size) and then holds only its own stage's layers."""
    local = {id(p) for p in stage.parameters()}
    for p in module.parameters():
        if id(p) not in local:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def batch_to_pipe(batch: dict[str, torch.Tensor], micro: int) -> tuple[tuple, tuple]:
    """(inputs of the first stage, labels of the last) for the engine's data iterator."""
    mask_bits = batch["loss_mask"].to(torch.int8)
    inputs = (batch["tokens"], mask_bits, torch.tensor([micro]))
    return inputs, (batch["labels"], batch["loss_mask"])


def build_pipeline_module(student: GPTModel, predictors: torch.nn.ModuleDict, teacher: GPTModel, ctx: PipeContext,
                          dims) -> torch.nn.Module:
    """DeepSpeed's PipelineModule over megatron's layout: its topology's rank order agrees with
    megatron-core's groups (pipe outermost, then data, then tensor)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    return PipelineModule(layers=pipe_layers(student, predictors, teacher, ctx), topology=topology,
                          loss_fn=make_loss_fn(ctx), partition_method="type:DecoderPipe")
