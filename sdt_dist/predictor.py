"""Predictors q_l of the predictive alignment (BYOL-style): Linear(d, d) - GELU - Linear(d, d).

One per student layer; they are trained with the student and are not part of the teacher. They run on
replicated hidden states, so under tensor parallelism each TP rank holds a full copy.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.spec_utils import ModuleSpec, build_module


class Predictor(torch.nn.Module):
    def __init__(self, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden_size, hidden_size)
        self.fc2 = torch.nn.Linear(hidden_size, hidden_size)
        for fc in (self.fc1, self.fc2):
            torch.nn.init.normal_(fc.weight, std=init_std)
            torch.nn.init.zeros_(fc.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(h)))


def predictor_spec() -> ModuleSpec:
    return ModuleSpec(module=Predictor)


def build_predictors(spec: ModuleSpec, num_layers: int, hidden_size: int, init_std: float) -> torch.nn.ModuleDict:
    """q_l for l = 1..L, keyed by the layer number as a string (ModuleDict keys)."""
    return torch.nn.ModuleDict(
        {str(layer): build_module(spec, hidden_size=hidden_size, init_std=init_std)
         for layer in range(1, num_layers + 1)}
    )
