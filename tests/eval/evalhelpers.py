"""Helpers of the evaluation tests: a small random GPTModel (needs the `single_rank` fixture)."""

from __future__ import annotations

import torch

from sdt_dist.config import Config
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config


def tiny_model(cfg: Config, seed: int = 0) -> GPTModel:
    """An eval-mode model with random weights (a larger init than 0.02, so that layers matter)."""
    m = cfg.model
    torch.manual_seed(seed)
    gpt = GPTModel(transformer_config(m, cfg.parallel), student_layer_specs([0.0] * m.num_layers), m.vocab_size,
                   m.tie_embeddings, m.rope_base)
    with torch.no_grad():
        for p in gpt.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return gpt.eval()
