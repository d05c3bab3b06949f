"""Rotary position embeddings built on the device of the tensors they rotate.

megatron-core's `RotaryEmbedding.get_emb` moves its frequencies to CUDA; this produces the same
[s, 1, 1, dim] angle tensor megatron's attention expects (`rotary_pos_emb=`) on CPU or CUDA alike.
"""

from __future__ import annotations

import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        # An integer arange: under ZeRO-3's zero.Init a floating one comes out in the training dtype, and bf16
        # frequencies gave the student other rotary angles than the (fp32) teacher.
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        # A buffer, not a parameter: not trained, not sharded by ZeRO, not in checkpoints.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq.to(device))
        # megatron rotates halves (rotary_interleaved=False): angles repeated over both halves
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
