"""Layer pruning at inference, as LayerDrop prescribes: remove k layers, keeping an evenly spaced subset.

Evaluation bypasses the removed layers with `GPTModel.forward(skip=...)`, the same identity LayerDrop
uses in training. `prune_model` builds the physically smaller model (for deployment); the tests check
that both give identical outputs, so the skip-based numbers are those of the pruned model.
"""

from __future__ import annotations

import dataclasses

from sdt_dist.distill.layerdrop import evenly_spaced_keep
from sdt_dist.model import GPTModel, student_layer_specs


def removed_layers(num_layers: int, num_remove: int) -> frozenset[int]:
    """1-based numbers of the layers removed when pruning `num_remove` of `num_layers`."""
    keep = set(evenly_spaced_keep(num_layers, num_remove))
    return frozenset(n for n in range(1, num_layers + 1) if n not in keep)


def prune_model(gpt: GPTModel, keep: list[int]) -> GPTModel:
    """A new GPTModel made of the layers `keep` (1-based, in order) of `gpt`, with copied weights."""
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 1 or keep[-1] > gpt.num_layers:
        raise ValueError(f"keep must be increasing layer numbers in 1..{gpt.num_layers}, got {keep}")
    config = dataclasses.replace(gpt.config, num_layers=len(keep))
    vocab = gpt.embedding.num_embeddings
    rope_base = gpt.layers[0].self_attention.core_attention.rope_base
    pruned = GPTModel(config, student_layer_specs([0.0] * len(keep), rope_base=rope_base), vocab, gpt.tie_embeddings)
    state = {}
    for name, tensor in gpt.state_dict().items():
        if not name.startswith("layers."):
            state[name] = tensor
            continue
        _, index, rest = name.split(".", 2)
        number = int(index) + 1
        if number in keep:
            state[f"layers.{keep.index(number)}.{rest}"] = tensor
    pruned.load_state_dict(state, strict=True)
    return pruned.train(gpt.training)
