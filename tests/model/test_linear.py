"""On one TP rank the layers' linears take the bias into the matmul (`model/linear.py`): the same losses and
gradients as megatron-core's own path (bias added apart), up to float rounding."""

import torch

from sdt_dist.distill import losses
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config
from sdt_dist.model.linear import _BiasInMatmul
from sdt_dist.plan.inventory import megatron_groups
from tests.helpers import make_cfg, random_batch


def _loss_and_grads(megatron_path: bool):
    cfg = make_cfg("model.dropout=0", "model.seq_length=16", "model.tie_embeddings=false")
    m = cfg.model
    with megatron_groups():
        torch.manual_seed(0)
        gpt = GPTModel(transformer_config(m, cfg.parallel),
                       student_layer_specs([0.0] * m.num_layers, rope_base=m.rope_base), m.vocab_size, m.tie_embeddings)
        with torch.no_grad():  # megatron-core starts biases at zero: make them count
            for name, p in gpt.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.1)
        linears = [mod for mod in gpt.modules() if isinstance(mod, _BiasInMatmul)]
        for mod in linears:
            mod._one_rank = False if megatron_path else None
        out = gpt(random_batch(cfg, 1)["tokens"])
        batch = random_batch(cfg, 1)
        loss = losses.lm_loss(out.logits, batch["labels"], batch["loss_mask"])
        loss.backward()
    assert len(linears) == 4 * m.num_layers
    fused = [mod._one_rank for mod in linears]
    return loss.detach(), [(n, p.grad) for n, p in gpt.named_parameters()], fused


def test_bias_in_the_matmul_gives_megatron_cores_losses_and_gradients():
    loss, grads, fused = _loss_and_grads(megatron_path=False)
    ref_loss, ref_grads, ref_fused = _loss_and_grads(megatron_path=True)
    assert all(fused) and not any(ref_fused)  # each side took the path it names
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for (name, g), (_, r) in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)
