"""The trained module: the student GPT and its alignment predictors, in one module for DeepSpeed.

The predictors run inside this forward so that ZeRO sees (and gathers/partitions) their parameters like
any other; only aligned layers that ran (not LayerDropped) produce a prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sdt_dist.model.gpt import GPTModel


class StudentOutput(NamedTuple):  # a tuple, so that ZeRO-3's hooks see the tensors inside
    logits: torch.Tensor
    predictions: dict[int, torch.Tensor]  # aligned layer -> predictor output
    trunk: dict[int, torch.Tensor]  # the output states of layers 1..n asked for (frozen: computed without autograd)


class Student(torch.nn.Module):
    def __init__(self, gpt: GPTModel, predictors: torch.nn.ModuleDict) -> None:
        super().__init__()
        self.gpt = gpt
        self.predictors = predictors

    def forward(self, tokens: torch.Tensor, skip: frozenset[int] = frozenset(), frozen_prefix: int = 0,
                aligned: tuple[int, ...] = (), trunk: int = 0) -> StudentOutput:
        """`trunk`: also return the output states of layers 1..n, for the teacher (`distill/shared_trunk.py`);
        they must be frozen layers that ran."""
        if trunk > frozen_prefix or skip & set(range(1, trunk + 1)):
            raise ValueError(f"a shared trunk of {trunk} layers needs them frozen (here {frozen_prefix}) and run")
        out = self.gpt(tokens, skip=skip, frozen_prefix=frozen_prefix)
        predictions = {layer: self.predictors[str(layer)](out.hidden[layer])
                       for layer in aligned if layer in out.hidden}
        return StudentOutput(out.logits, predictions, {n: out.hidden[n] for n in range(1, trunk + 1)})
