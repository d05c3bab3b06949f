"""Progressive freezing: at each milestone the lowest floor(alpha_m * L) layers (and, with
`distill.freeze_embedding`, the embedding) leave the optimizer for good.

This module says which parameters freeze; when the count changes is a pure function of the step
(`schedules.frozen_layers_at`). Taking them out of a DeepSpeed optimizer exactly is
`sdt_dist/parallel/optimizer_state.py`'s job (`SDTrainModule.freeze` joins the two).
"""

from __future__ import annotations

import torch

from sdt_dist.model.gpt import GPTModel


def frozen_parameters(gpt: GPTModel, num_frozen: int, include_embedding: bool = True) -> list[torch.nn.Parameter]:
    """Layers 1..num_frozen, and the embedding if `include_embedding` (with tied embeddings the head is the
    embedding, so it freezes too)."""
    if num_frozen <= 0:
        return []
    params = list(gpt.embedding.parameters()) if include_embedding else []
    for layer in gpt.layers[:num_frozen]:
        params.extend(layer.parameters())
    return params
