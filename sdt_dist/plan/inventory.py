"""The parameters of a configuration, read off the real model built on the meta device (no weight memory).

The student GPT and its predictors are built exactly as the trainer builds them, but under
`torch.device("meta")`: shapes, tensor-parallel split marks (megatron-core's `tensor_model_parallel`) and
the order of parameters are the real ones, and a 7B model costs no memory and well under a second. Every
layout (TP, PP, DP, ZeRO) is then computed from this one inventory by `sdt_dist/plan/memory.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from sdt_dist.config import Config
from sdt_dist.distill.freezing import frozen_parameters
from sdt_dist.distill.predictor import build_predictors, predictor_spec
from sdt_dist.distill.schedules import frozen_layers_at
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config


@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int  # whole (tensor-parallel size 1)
    tp_split: bool  # split over the TP group (column/row-parallel weights, vocab-parallel embedding)
    matrix: bool  # ndim >= 2: the AdamW decay group (`parallel/engine.py:param_groups`)
    unit: str  # embedding | layer | final_norm | head | predictor: what a pipeline stage holds
    layer: int = 0  # 1-based layer number of a layer's or predictor's parameter
    frozen_at_end: bool = False  # frozen after the last freezing milestone

    def local(self, tp: int) -> int:
        """Elements held by one TP rank."""
        return self.numel // tp if self.tp_split else self.numel


@contextlib.contextmanager
def megatron_groups() -> Iterator[int]:
    """megatron-core's layers read its parallel state at construction. Inside a run it is there (any TP
    size: the caller gets it back); in the planner a one-process group stands in, and is removed after."""
    if ps.model_parallel_is_initialized():
        yield ps.get_tensor_model_parallel_world_size()
        return
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    try:
        yield 1
    finally:
        ps.destroy_model_parallel()
        if started:
            dist.destroy_process_group()


def _unit(name: str) -> tuple[str, int]:
    part = name.split(".")
    if part[0] == "layers":
        return "layer", int(part[1]) + 1
    if part[0] == "predictors":
        return "predictor", int(part[1])
    return {"embedding": "embedding", "final_norm": "final_norm", "output_layer": "head"}[part[0]], 0


def parameter_inventory(cfg: Config) -> list[ParamInfo]:
    """Student GPT then predictors, in the trainer's parameter order, with whole (TP = 1) sizes."""
    m = cfg.model
    with megatron_groups() as built_tp:
        parallel = dataclasses.replace(cfg.parallel, tensor=built_tp, pipeline=1, sequence_parallel=False)
        tconf = transformer_config(m, parallel, torch.float32)
        with torch.device("meta"):  # normal_() on meta tensors draws nothing: the caller's RNG is untouched
            gpt = GPTModel(tconf, student_layer_specs([0.0] * m.num_layers, rope_base=m.rope_base), m.vocab_size,
                           m.tie_embeddings)
            predictors = build_predictors(predictor_spec(), m.num_layers, m.hidden_size, m.init_std)
    frozen_end = frozen_layers_at(cfg.train.max_steps, cfg.distill, m.num_layers, cfg.train.max_steps)
    frozen_ids = {id(p) for p in frozen_parameters(gpt, frozen_end)}
    out = []
    for prefix, module in (("", gpt), ("predictors.", predictors)):
        for name, p in module.named_parameters():
            split = bool(getattr(p, "tensor_model_parallel", False))
            unit, layer = _unit(prefix + name)
            out.append(ParamInfo(prefix + name, p.numel() * (built_tp if split else 1), split, p.ndim >= 2, unit,
                                 layer, id(p) in frozen_ids))
    return out
