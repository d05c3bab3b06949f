"""The trained module: the student GPT and its alignment predictors, in one module for DeepSpeed.

The predictors run inside this forward so that ZeRO sees (and gathers/partitions) their parameters like
any other; only aligned layers that ran (not LayerDropped) produce a prediction.
"""

from __future__ import annotations

import torch

from sdt_dist.model.gpt import GPTModel


class Student(torch.nn.Module):
    def __init__(self, gpt: GPTModel, predictors: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.gpt = gpt
        self.predictors = predictors

    def forward(self, tokens: torch.Tensor, skip: frozenset[int] = frozenset(), frozen_prefix: int = 0,
                aligned: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        out = self.gpt(tokens, skip=skip, frozen_prefix=frozen_prefix)
        predictions = {layer: self.predictors[str(layer)](out.hidden[layer])
                       for layer in aligned if layer in out.hidden}
        return out.logits, predictions
