"""Layer specs: the student's and the teacher's decoder layers, composed from megatron-core modules.

Pre-LayerNorm, rotary attention through torch SDPA, GELU MLP; linears are megatron-core's column/row
tensor-parallel linears (on one TP rank with the bias inside the matmul: `linear.py`), so the same spec
runs at any TP size. The student's layers carry their LayerDrop rate; the teacher's spec is the same layer
with p = 0.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from sdt_dist.config import ModelConfig, ParallelConfig
from sdt_dist.model.attention import SDPAttention
from sdt_dist.model.layerdrop_layer import LayerDropTransformerLayer
from sdt_dist.model.linear import FusedBiasColumnParallelLinear, FusedBiasRowParallelLinear
from sdt_dist.model.norm import LayerNorm


def decoder_layer_spec(drop_prob: float = 0.0, recompute: str = "none", rope_base: float = 10000.0) -> ModuleSpec:
    """`recompute` (model.recompute): none, selective (the attention core) or full (the whole layer);
    `rope_base` (model.rope_base): the rotary embeddings' base, applied by the attention core."""
    return ModuleSpec(
        module=LayerDropTransformerLayer,
        params={"drop_prob": drop_prob, "recompute": recompute},
        submodules=TransformerLayerSubmodules(
            input_layernorm=LayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=FusedBiasColumnParallelLinear,
                    core_attention=ModuleSpec(module=SDPAttention, params={"recompute": recompute == "selective",
                                                                           "rope_base": rope_base}),
                    linear_proj=FusedBiasRowParallelLinear,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=LayerNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=FusedBiasColumnParallelLinear,
                                        linear_fc2=FusedBiasRowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def student_layer_specs(drop_probs: list[float], recompute: str = "none",
                        rope_base: float = 10000.0) -> list[ModuleSpec]:
    return [decoder_layer_spec(p, recompute, rope_base) for p in drop_probs]


def teacher_layer_specs(num_layers: int, rope_base: float = 10000.0) -> list[ModuleSpec]:
    return [decoder_layer_spec(0.0, rope_base=rope_base) for _ in range(num_layers)]


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32
) -> TransformerConfig:
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        layernorm_epsilon=1e-5,
        tensor_model_parallel_size=parallel.tensor,
        pipeline_model_parallel_size=parallel.pipeline,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Master weights are created whole and split on the host: identical weights at any TP size.
        use_cpu_initialization=True,
        # The fused kernels below need CUDA/apex/TE; the unfused paths are exact and portable.
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
