"""Rotary embeddings in the attention core (`sdt_dist/model/rope.py`) against megatron-core's own rotation."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from sdt_dist.model.rope import apply_rope, rotary_cos_sin
from tests.helpers import make_cfg, random_batch, tiny_model


def _megatron_angles(seq_len: int, head_dim: int, base: float) -> torch.Tensor:
    """The [s, 1, 1, head_dim] angles megatron's `rotary_pos_emb` takes (rotated halves: repeated)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_bitwise_megatrons_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(0)
    s, b, heads, d, base = 24, 3, 4, 16, 500.0
    # a view of a wider tensor, as megatron's split of the fused QKV output gives
    q = (torch.randn(s, b, heads, 3 * d, generator=g) * 3).to(dtype)[..., d:2 * d]
    upstream = torch.randn(s, b, heads, d, generator=g).to(dtype)
    ref_in, got_in = q.clone().requires_grad_(True), q.clone().requires_grad_(True)
    ref = _apply_rotary_pos_emb_bshd(ref_in, _megatron_angles(s, d, base))
    got = apply_rope(got_in, *rotary_cos_sin(s, d, base, q.device))
    ref.backward(upstream)
    got.backward(upstream)
    assert got.dtype == dtype and torch.equal(got, ref)
    assert torch.equal(got_in.grad, ref_in.grad)
    assert not torch.equal(got, q)  # it did rotate


def test_the_model_rotates_as_megatron_does(single_rank):
    """The whole student with the rotation in its attention core equals the same weights run through megatron's
    `rotary_pos_emb` path (the attention core left without it)."""
    cfg = make_cfg("model.dropout=0", "model.rope_base=500")
    gpt = tiny_model(cfg)
    tokens = random_batch(cfg, 0)["tokens"]
    ours = gpt(tokens)
    angles = _megatron_angles(tokens.size(1), cfg.model.hidden_size // cfg.model.num_attention_heads, 500.0)
    cores = [layer.self_attention.core_attention for layer in gpt.layers]
    for core in cores:
        core.rope_base = None
    try:
        h = gpt.embed(tokens)
        for layer in gpt.layers:
            h, _ = layer(h, attention_mask=None, rotary_pos_emb=angles)
        logits = gpt.head(h)
    finally:
        for core in cores:
            core.rope_base = 500.0
    assert torch.equal(ours.logits, logits)


def test_cos_sin_first_asked_for_under_inference_mode_can_be_saved_for_backward():
    with torch.inference_mode():
        cos, sin = rotary_cos_sin(5, 8, 123.0, torch.device("cpu"))
    assert not cos.is_inference() and not sin.is_inference()
    t = torch.randn(5, 1, 2, 8, requires_grad=True)
    apply_rope(t, cos, sin).sum().backward()
    assert t.grad is not None
