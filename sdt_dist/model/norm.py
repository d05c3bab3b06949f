"""LayerNorm for megatron-core specs that also runs on sequence-parallel activations.

megatron-core's `WrappedTorchNorm` refuses sequence parallelism (its fused norms mark their parameters
instead). This is torch's LayerNorm with that same mark: under sequence parallelism each TP rank normalises
its own slice of the sequence, so the weight and bias gradients are partial sums over tokens and must be
all-reduced across the TP group (`sdt_dist/parallel/sequence_parallel.py` does it).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class LayerNorm(torch.nn.LayerNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel  # the attribute megatron-core's norms set
