"""Building one pipeline stage's share of a model with the random draws of the whole.

Every weight is drawn from the global generator in construction order (megatron's CPU initialisation: the
whole fp32 master of a matrix, then this TP rank's slice), so building only a stage's layers would change the
draws and the initial weights would depend on the layout. Instead every unit of the model is still built,
in order, and a unit of another stage has its weights dropped as soon as it is built: the kept weights are
bitwise those of a whole-model init, the generator ends in the same state, and a rank holds its stage plus
the one unit being built (and megatron's master of one matrix), never the whole model.

Units are numbered as the pipeline's layers: 0 the embedding, 1..L the decoder layers (a layer's predictor
goes with it), L + 1 the final norm and the head.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def drop_weights(module: M) -> M:
    """Free `module`'s parameter values; the parameters stay (names, flags), with no elements."""
    for p in module.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return module


def build_unit(unit: int, kept: Container[int] | None, build: Callable[[], M]) -> M:
    """Build unit `unit`; keep its weights if `kept` (None: every unit) holds it."""
    module = build()
    return module if kept is None or unit in kept else drop_weights(module)


def holds_weights(p: torch.nn.Parameter) -> bool:
    """Whether this rank holds `p`'s values or, under ZeRO-3, a partition of them (not a dropped unit's)."""
    return p.numel() > 0 or hasattr(p, "ds_id")
