"""SDTrainModule: owns the student (+ predictors) inside a DeepSpeed engine, the EMA teacher and the
freezing state. The trainer drives it; `train_step.py` is the algorithm written against it.
"""

from __future__ import annotations

import torch

from sdt_dist.config import Config
from sdt_dist.freezing import frozen_parameters, restore_optimizer_state, snapshot_optimizer_state
from sdt_dist.layerdrop import layer_probs
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
from sdt_dist.predictor import build_predictors, predictor_spec
from sdt_dist.schedules import layer_map
from sdt_dist.teacher import EmaTeacher


class SDTrainModule:
    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        m, d = cfg.model, cfg.distill
        self.ds_config = build_ds_config(cfg, dims.dp)
        self.dtype = compute_dtype(self.ds_config)
        tconf = transformer_config(m, cfg.parallel, self.dtype)
        self.drop_probs = layer_probs(d.layerdrop_p, m.num_layers, d.layerdrop_schedule)
        self.layer_map = layer_map(d.align_map, m.num_layers, d.teacher_layers or m.num_layers)
        # Same seed on every rank: identical master weights, split by TP and partitioned by ZeRO.
        torch.manual_seed(cfg.train.seed)
        with model_init_context(self.ds_config, dims):
            self.student = Student(
                GPTModel(tconf, student_layer_specs(self.drop_probs), m.vocab_size, m.tie_embeddings, m.rope_base),
                build_predictors(predictor_spec(), m.num_layers, m.hidden_size, m.init_std),
            )
        self.frozen = 0
        self.engine = self._build_engine()
        teacher_gpt = GPTModel(tconf, teacher_layer_specs(m.num_layers), m.vocab_size, m.tie_embeddings,
                               m.rope_base).to(device())
        self.teacher = EmaTeacher(teacher_gpt, self.student.gpt, dims.dp_group if dims.dp > 1 else None,
                                  self.dtype)

    def _build_engine(self):
        groups = param_groups(list(self.student.named_parameters()), self.cfg.train.weight_decay)
        t = self.cfg.train
        return initialize_engine(self.student, groups, self.ds_config, t.lr, tuple(t.betas), self.dims)

    @property
    def gpt(self) -> GPTModel:
        return self.student.gpt

    def student_gpt_params(self) -> list[torch.nn.Parameter]:
        return list(self.gpt.parameters())

    def frozen_indices(self) -> frozenset[int]:
        """Indices (in `student_gpt_params` order) of frozen parameters: the teacher copies them."""
        ids = {id(p) for p in frozen_parameters(self.gpt, self.frozen)}
        return frozenset(i for i, p in enumerate(self.student_gpt_params()) if id(p) in ids)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def freeze(self, num_frozen: int, carry_state: bool = True) -> None:
        """Freeze layers 1..num_frozen (and the embedding) for good: rebuild the optimizer without them.

        `carry_state=False` is for a resume, where the checkpoint restores the optimizer anyway."""
        if num_frozen <= self.frozen:
            return
        newly = frozen_parameters(self.gpt, num_frozen)
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
