"""Decoder-only GPT assembled from megatron-core building blocks.

Vocab-parallel embedding -> decoder layers (from a spec list) -> final LayerNorm -> column-parallel head
(optionally tied to the embedding). With sequence parallelism the embedding reduce-scatters along the
sequence, hidden states are [s/tp, b, d] per TP rank, and the head's linear gathers them back.
The forward returns vocab-parallel logits and, explicitly, the output hidden state of every layer that
ran: the alignment loss reads them, skipped layers are absent.
"""

from __future__ import annotations

from collections.abc import Container
from typing import NamedTuple

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from sdt_dist.model.norm import LayerNorm
from sdt_dist.model.stage_init import build_unit


class GPTOutput(NamedTuple):  # a tuple, so that ZeRO-3's hooks see the tensors inside
    logits: torch.Tensor  # [b, s, vocab / tp]
    hidden: dict[int, torch.Tensor]  # layer number (1-based) -> [s, b, d] ([s/tp, b, d] with SP), layers that ran


class TiedVocabEmbedding(tensor_parallel.VocabParallelEmbedding):
    """Vocab-parallel embedding whose weight can also serve as the output head.

    The tied head runs inside this module's forward, so that ZeRO-3 gathers the shared weight for it (and
    again for its backward) like for any weight used by its own module."""

    def forward(self, x: torch.Tensor, head: tensor_parallel.ColumnParallelLinear | None = None) -> torch.Tensor:
        if head is None:
            return super().forward(x)
        return head(x, weight=self.weight)[0]


def embed_tokens(embedding: TiedVocabEmbedding, dropout: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] tokens -> [s, b, d] hidden states, megatron's activation layout (the sequence-parallel
    embedding transposes and reduce-scatters by itself: [s/tp, b, d])."""
    h = embedding(tokens)
    return dropout(h if embedding.reduce_scatter_embeddings else h.transpose(0, 1).contiguous())


class GPTModel(torch.nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        layer_specs: list[ModuleSpec],
        vocab_size: int,
        tie_embeddings: bool = True,
        kept: Container[int] | None = None,
    ) -> None:
        """`kept`: the units (0 embedding, 1..L layers, L + 1 final norm and head) whose weights this rank keeps
        (a pipeline stage's); the others are built and dropped one at a time (`stage_init.py`). None: all."""
        super().__init__()
        self.config = config
        self.tie_embeddings = tie_embeddings
        self.embedding = build_unit(0, kept, lambda: TiedVocabEmbedding(
            vocab_size, config.hidden_size, init_method=config.init_method, config=config,
            reduce_scatter_embeddings=config.sequence_parallel,
        ))
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)
        self.layers = torch.nn.ModuleList(
            build_unit(i + 1, kept, lambda spec=spec, number=i + 1: build_module(spec, config=config,
                                                                                 layer_number=number))
            for i, spec in enumerate(layer_specs)
        )
        head = len(layer_specs) + 1
        self.final_norm = build_unit(head, kept, lambda: LayerNorm(config, config.hidden_size,
                                                                   eps=config.layernorm_epsilon))
        self.output_layer = build_unit(head, kept, lambda: tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            vocab_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,  # logits stay vocab-parallel; losses reduce across TP ranks
            skip_weight_param_allocation=tie_embeddings,
        ))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.embedding, self.embedding_dropout, tokens)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        logits = self.embedding(h, head=self.output_layer) if self.tie_embeddings else self.output_layer(h)[0]
        return logits.transpose(0, 1)  # [b, s, vocab / tp]

    def forward(
        self, tokens: torch.Tensor, skip: frozenset[int] = frozenset(), frozen_prefix: int = 0,
        trunk: dict[int, torch.Tensor] | None = None,
    ) -> GPTOutput:
        """`skip`: layer numbers to bypass (LayerDrop in training, pruning at inference).
        `frozen_prefix`: the embedding and layers 1..k are frozen; they run without autograd so that
        backward stops at the boundary.
        `trunk`: the output states of layers 1..j from another forward with the same weights (the shared frozen
        trunk): the embedding and those layers do not run, the forward starts at layer j + 1 from trunk[j] and
        reports trunk's states as its own."""
        hidden = dict(trunk or {})
        start = len(hidden)
        if sorted(hidden) != list(range(1, start + 1)) or skip & set(hidden):
            raise ValueError(f"a trunk holds the states of layers 1..j, none skipped; got {sorted(hidden)}")
        if start:
            h = hidden[start]
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_prefix == 0):
                h = self.embed(tokens)
        for number, layer in enumerate(self.layers[start:], start=start + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and number > frozen_prefix):
                h, _ = layer(h, attention_mask=None, skip=number in skip)
            if number not in skip:
                hidden[number] = h
        return GPTOutput(logits=self.head(h), hidden=hidden)
