"""Core attention for megatron-core's `SelfAttention` slot, through torch SDPA, with rotary embeddings.

Stock `DotProductAttention` allocates on `torch.cuda` and forks the CUDA RNG tracker; this module
keeps the same interface (megatron's [s, b, heads, dim] layout in, [s, b, heads*dim] out) and runs on
any device, picking the fused kernel torch has for it (flash / memory-efficient on CUDA). With `rope_base` it
first rotates queries and keys (`rope.py`: megatron's rotation, bitwise, at half its cost), so the layers are
called without megatron's `rotary_pos_emb`.

`recompute=True` (model.recompute: selective) checkpoints this attention core, as megatron-core's selective
recomputation does (whose own checkpoint needs CUDA's RNG tracker): the s x s scores and dropout mask are
not kept but recomputed in backward, with the same RNG state. Fused kernels keep no scores anyway, so the
saving is large on the math path (attention dropout on CPU, or no fused kernel) and small otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from sdt_dist.model.rope import apply_rope, rotary_cos_sin


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        recompute: bool = False,
        rope_base: float | None = None,
        **_unused,  # megatron passes cp_comm_type / pg_collection; neither applies here
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal masks only, got {attn_mask_type}")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.recompute = recompute
        self.rope_base = rope_base

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if self.rope_base is not None:  # positions 0..s-1: the whole sequence (sequence parallelism gathered it)
            cos, sin = rotary_cos_sin(query.size(0), query.size(-1), self.rope_base, query.device)
            query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._attend, query, key, value, use_reentrant=False)
        return self._attend(query, key, value)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if k.size(1) != q.size(1):  # grouped-query attention: repeat kv heads
            k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
            v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout_p if self.training else 0.0,
            scale=self.softmax_scale,
        )
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
