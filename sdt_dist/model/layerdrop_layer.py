"""The decoder layer LayerDrop can skip: the model's side of LayerDrop (which layers to skip, and when, is
the method's: `sdt_dist/distill/layerdrop.py`).

`recompute="full"` checkpoints the layer (torch's non-reentrant checkpoint, which replays the RNG state, so
dropout masks are identical on recompute): only its input is kept for backward. A skipped layer and the
frozen prefix (run without autograd) have nothing to recompute and are not checkpointed.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch.utils.checkpoint import checkpoint


class LayerDropTransformerLayer(TransformerLayer):
    """A megatron-core `TransformerLayer` that can be skipped; `drop_prob` is its LayerDrop rate."""

    def __init__(self, *args, drop_prob: float = 0.0, recompute: str = "none", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop_prob = drop_prob
        self.recompute_full = recompute == "full"

    def forward(self, hidden_states: torch.Tensor, *args, skip: bool = False, **kwargs):
        if skip:
            return hidden_states, None
        if self.recompute_full and torch.is_grad_enabled():
            return checkpoint(super().forward, hidden_states, *args, use_reentrant=False, **kwargs)
        return super().forward(hidden_states, *args, **kwargs)
