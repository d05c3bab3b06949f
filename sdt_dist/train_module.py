"""SDTrainModule: owns the student (+ predictors) inside a DeepSpeed engine, the EMA teacher and the
freezing state. The trainer drives it; `train_step.py` is the algorithm written against it.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps

from sdt_dist.config import Config
from sdt_dist.distill.freezing import frozen_parameters
from sdt_dist.distill.layerdrop import layer_probs
from sdt_dist.distill.predictor import build_predictors, predictor_spec
from sdt_dist.distill.schedules import layer_map
from sdt_dist.distill.teacher import EmaTeacher
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
from sdt_dist.parallel.optimizer_state import restore_optimizer_state, snapshot_optimizer_state
from sdt_dist.parallel.pipeline import PipeContext, build_pipeline_module, release_other_stages, stage_pieces
from sdt_dist.parallel.sequence_parallel import (
    allreduce_sequence_parallel_grads,
    mark_sequence_parallel,
    place_megatron_buffers_on_accelerator,
)


class SDTrainModule:
    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        m, d = cfg.model, cfg.distill
        if cfg.parallel.sequence_parallel:
            place_megatron_buffers_on_accelerator()  # megatron-core allocates SP buffers on CUDA by default
        self.ds_config = build_ds_config(cfg, dims.dp)
        self.dtype = compute_dtype(self.ds_config)
        tconf = transformer_config(m, cfg.parallel, self.dtype)
        self.drop_probs = layer_probs(d.layerdrop_p, m.num_layers, d.layerdrop_schedule)
        self.layer_map = layer_map(d.align_map, m.num_layers, d.teacher_layers or m.num_layers)
        # Same seed on every rank: identical master weights, split by TP and partitioned by ZeRO.
        torch.manual_seed(cfg.train.seed)
        with model_init_context(self.ds_config, dims):
            gpt = GPTModel(tconf, student_layer_specs(self.drop_probs, m.recompute), m.vocab_size, m.tie_embeddings,
                           m.rope_base)
            predictors = build_predictors(predictor_spec(), m.num_layers, m.hidden_size, m.init_std)
        if cfg.train.init_from is not None:  # before the engine copies the weights and the teacher takes them
            load_initial_weights(gpt, cfg.train.init_from, m, dims.tp_group if dims.tp > 1 else None)
        if cfg.parallel.sequence_parallel:
            # predictors see this rank's slice of the sequence; their gradients, like the LayerNorms' and
            # the row-parallel biases', are summed over the TP group
            mark_sequence_parallel(predictors)
            allreduce_sequence_parallel_grads(gpt, dims.tp_group)
            allreduce_sequence_parallel_grads(predictors, dims.tp_group)
        teacher_gpt = GPTModel(tconf, teacher_layer_specs(m.num_layers), m.vocab_size, m.tie_embeddings,
                               m.rope_base).to(device())
        self.gpt = gpt  # under PP, only this stage's parameters keep their weights (see below)
        self.predictors = predictors
        self.teacher_gpt = teacher_gpt
        self.frozen = 0
        dp_group = dims.dp_group if dims.dp > 1 else None
        if dims.pp == 1:
            self.pipe_ctx = None
            self.student = Student(gpt, predictors)
            self.engine = self._build_engine()
            self.ema_source: torch.nn.Module = gpt
            self.teacher = EmaTeacher(teacher_gpt, gpt, dp_group, self.dtype)
        else:
            self.pipe_ctx = PipeContext(
                seed=cfg.train.seed, drop_probs=self.drop_probs, temperature=d.temperature, lambda_kd=d.lambda_kd,
                lambda_sd=d.lambda_sd, align_reduce=d.align_reduce, dtype=self.dtype,
                tp_group=dims.tp_group if dims.tp > 1 else None,
                sp_group=dims.tp_group if cfg.parallel.sequence_parallel else None)
            self.student = build_pipeline_module(gpt, predictors, teacher_gpt, self.pipe_ctx, dims)
            self.engine = self._build_engine()
            self.ema_source, teacher_pieces = stage_pieces(self.student)
            self.teacher = EmaTeacher(teacher_pieces, self.ema_source, dp_group, self.dtype)
            for whole, stage in ((gpt, self.student), (predictors, self.student), (teacher_gpt, teacher_pieces)):
                release_other_stages(whole, stage)

    def _build_engine(self):
        groups = param_groups(list(self.student.named_parameters()), self.cfg.train.weight_decay)
        t = self.cfg.train
        return initialize_engine(self.student, groups, self.ds_config, t.lr, tuple(t.betas), self.dims)

    def student_gpt_params(self) -> list[torch.nn.Parameter]:
        """The student parameters the EMA teacher averages (this stage's, under PP), in its order."""
        return list(self.ema_source.parameters())

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
        """Indices (in `student_gpt_params` order) of frozen parameters: the teacher copies them."""
        ids = {id(p) for p in frozen_parameters(self.gpt, self.frozen, self.cfg.distill.freeze_embedding)}
        return frozenset(i for i, p in enumerate(self.student_gpt_params()) if id(p) in ids)

    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Full student and teacher weights under GPTModel names (collective; complete on global rank 0)."""
        local_ids = {id(p) for p in self.student_gpt_params()}
        student = [(n, p) for n, p in self.gpt.named_parameters() if id(p) in local_ids]
        teacher_values = dict(zip((id(p) for p in self.teacher.params), self.teacher.full_parameters()))
        teacher = [(n, p) for n, p in self.teacher_gpt.named_parameters() if id(p) in teacher_values]
        tp_group = self.dims.tp_group if self.dims.tp > 1 else None
        pp_group = ps.get_pipeline_model_parallel_group() if self.dims.pp > 1 else None
        return (gather_full_state(student, None, tp_group, pp_group),
                gather_full_state(teacher, [teacher_values[id(p)] for _, p in teacher], tp_group, pp_group))

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
        lrs = [g["lr"] for g in self.engine.optimizer.param_groups]
        for p in newly:
            p.requires_grad_(False)
            p.grad = None
        self.engine.destroy()
        self.engine = self._build_engine()
        for group, lr in zip(self.engine.optimizer.param_groups, lrs):
            group["lr"] = lr
        if snap is not None:
            restore_optimizer_state(self.engine, kept, snap)
        self.frozen = num_frozen
