"""The decoder layer LayerDrop can skip: the model's side of LayerDrop (which layers to skip, and when, is
the method's: `sdt_dist/layerdrop.py`)."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class LayerDropTransformerLayer(TransformerLayer):
    """A megatron-core `TransformerLayer` that can be skipped; `drop_prob` is its LayerDrop rate."""

    def __init__(self, *args, drop_prob: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor, *args, skip: bool = False, **kwargs):
        if skip:
            return hidden_states, None
        return super().forward(hidden_states, *args, **kwargs)
