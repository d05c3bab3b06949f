"""Pruning: a model built from the kept layers only gives exactly the full model's outputs with the removed
layers skipped (the identity LayerDrop uses), so skip-based pruning numbers are those of the pruned model."""

from __future__ import annotations

import pytest
import torch

from sdt_dist.distill.layerdrop import evenly_spaced_keep
from sdt_dist.eval.pruning import prune_model, removed_layers
from tests.helpers import make_cfg, tiny_model


@pytest.mark.parametrize("num_layers,k", [(6, 0), (6, 1), (6, 2), (6, 3), (6, 5), (10, 3)])
def test_removed_layers_complement_evenly_spaced_keep(num_layers, k):
    removed = removed_layers(num_layers, k)
    assert len(removed) == k
    assert sorted(removed | set(evenly_spaced_keep(num_layers, k))) == list(range(1, num_layers + 1))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_pruned_model_equals_skip(single_rank, tied, k):
    cfg = make_cfg("model.num_layers=6", f"model.tie_embeddings={str(tied).lower()}", "model.rope_base=500")
    full = tiny_model(cfg, seed=k)
    keep = evenly_spaced_keep(6, k)
    pruned = prune_model(full, keep).eval()
    assert pruned.num_layers == 6 - k
    g = torch.Generator().manual_seed(k)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, cfg.model.seq_length), generator=g)
    with torch.no_grad():
        skipped = full(tokens, skip=removed_layers(6, k))
        small = pruned(tokens)
        unpruned = full(tokens)
    assert torch.equal(small.logits, skipped.logits)
    for i, number in enumerate(keep, start=1):
        assert torch.equal(small.hidden[i], skipped.hidden[number])
    assert not torch.allclose(small.logits, unpruned.logits, atol=1e-3)  # the removed layers did matter


def test_prune_model_rejects_bad_keep(single_rank):
    full = tiny_model(make_cfg())
    for keep in ([], [2, 1], [0, 1], [1, 5], [1, 1]):
        with pytest.raises(ValueError):
            prune_model(full, keep)
