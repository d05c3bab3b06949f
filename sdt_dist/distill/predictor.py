"""Predictors q_l of the predictive alignment (BYOL-style): Linear(d, d) - GELU - Linear(d, d).

One per student layer; they are trained with the student and are not part of the teacher. Each TP rank
holds a full copy; with sequence parallelism it runs on the rank's slice of the sequence and its gradients
are summed over the TP group (`sdt_dist/parallel/sequence_parallel.py`).
"""

from __future__ import annotations

from collections.abc import Container

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from sdt_dist.model.stage_init import build_unit


class Predictor(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        # Parameters are created and initialised in this __init__ (not in nn.Linear children): ZeRO-3's
        # zero.Init partitions each module at the end of its own __init__, after which init is a no-op.
        self.w1 = torch.nn.Parameter(torch.empty(hidden_size, hidden_size).normal_(std=init_std))
        self.b1 = torch.nn.Parameter(torch.zeros(hidden_size))
        self.w2 = torch.nn.Parameter(torch.empty(hidden_size, hidden_size).normal_(std=init_std))
        self.b2 = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        f = torch.nn.functional
        return f.linear(f.gelu(f.linear(h, self.w1, self.b1)), self.w2, self.b2)


def predictor_spec() -> ModuleSpec:
    return ModuleSpec(module=Predictor)


def build_predictors(spec: ModuleSpec, num_layers: int, hidden_size: int, init_std: float,
                     kept: Container[int] | None = None) -> torch.nn.ModuleDict:
    """q_l for l = 1..L, keyed by the layer number as a string (ModuleDict keys). `kept`: the layers whose
    predictors keep their weights (a pipeline stage's; the others are built and dropped, `stage_init.py`)."""
    return torch.nn.ModuleDict(
        {str(layer): build_unit(layer, kept, lambda: build_module(spec, hidden_size=hidden_size, init_std=init_std))
         for layer in range(1, num_layers + 1)}
    )
