"""Activation checkpointing (model.recompute): same losses and gradients, fewer activations kept."""

import pytest
import torch

from sdt_dist.distill import losses
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config
from sdt_dist.plan.inventory import megatron_groups
from tests.helpers import make_cfg, random_batch


def _run(mode: str, dropout: float, seq: int = 16, saved: list | None = None):
    with megatron_groups():  # megatron-core's parallel state for one process (no DeepSpeed start needed)
        return _forward_backward(mode, dropout, seq, saved)


def _forward_backward(mode: str, dropout: float, seq: int, saved: list | None):
    """Loss and parameter gradients of one forward/backward with LayerDrop (layer 3 skipped) and a frozen
    prefix (layer 1); with `saved`, also the bytes autograd keeps for backward (weights excluded)."""
    cfg = make_cfg(f"model.dropout={dropout}", f"model.seq_length={seq}", "model.tie_embeddings=false")
    m = cfg.model
    torch.manual_seed(0)
    gpt = GPTModel(transformer_config(m, cfg.parallel), student_layer_specs([0.0] * m.num_layers, mode, m.rope_base),
                   m.vocab_size, m.tie_embeddings)
    for p in list(gpt.embedding.parameters()) + list(gpt.layers[0].parameters()):
        p.requires_grad_(False)
    batch = random_batch(cfg, 1)
    weights = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in weights:
            kept[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(1)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gpt(batch["tokens"], skip=frozenset({3}), frozen_prefix=1)
    loss = losses.lm_loss(out.logits, batch["labels"], batch["loss_mask"]) + sum(
        h.float().pow(2).mean() for h in out.hidden.values())
    loss.backward()
    if saved is not None:
        saved.append(sum(kept.values()))
    return loss.detach(), [(n, p.grad) for n, p in gpt.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("mode", ["selective", "full"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # with dropout: the recomputed masks are the same ones
def test_recompute_gives_the_same_loss_and_gradients(mode, dropout):
    ref_loss, ref_grads = _run("none", dropout)
    loss, grads = _run(mode, dropout)
    assert torch.equal(loss, ref_loss)
    assert len(grads) == len(ref_grads) > 0
    for (name, g), (_, r) in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=0, msg=name)


def test_recompute_keeps_fewer_activations():
    saved: list[int] = []
    for mode in ("none", "selective", "full"):
        _run(mode, dropout=0.1, seq=64, saved=saved)
    none, selective, full = saved
    print(f"activation bytes kept for backward: none {none}, selective {selective}, full {full}")
    assert full < selective < none


def test_recompute_under_zero3_engine_gives_the_same_steps(single_rank):
    """Through the trainer's engine (ZeRO-3 gathers weights by module hooks, which fire again on recompute)."""
    import dataclasses

    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    losses_by_mode = {}
    for mode in ("none", "selective", "full"):
        cfg = make_cfg("model.dropout=0", "parallel.zero_stage=3", "parallel.ds_config=ds_configs/zero3.json",
                       "distill.layerdrop_p=0.3", f"model.recompute={mode}")
        tm = SDTrainModule(cfg, dataclasses.replace(single_rank, zero_stage=3))
        losses_by_mode[mode] = [train_step(tm, [random_batch(cfg, step)], step).loss for step in range(3)]
        tm.engine.destroy()
    for mode in ("selective", "full"):
        assert losses_by_mode[mode] == pytest.approx(losses_by_mode["none"], rel=1e-6, abs=0)
