"""What one optimizer step decides before any forward: its number, which layers LayerDrop skips in each
micro-batch, which layers are aligned, how many of the lowest layers run without autograd, and how many of
those the teacher takes from the student.

Immutable and the same on every rank: the step passes it down to the student forward (one micro-batch at a
time, or every pipeline stage) instead of each piece asking for per-step state.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdt_dist.distill.layerdrop import sample_dropped


@dataclass(frozen=True)
class StepPlan:
    step: int
    training: bool  # False for validation: no LayerDrop, no teacher forward, LM loss only
    aligned: frozenset[int] = frozenset()  # layers whose predictors are aligned to the teacher this step
    no_grad_prefix: int = 0  # the embedding and layers 1..k run without autograd (frozen, embedding included)
    # the teacher takes the output states of layers 1..n from the student (`shared_trunk.py`; 0: none)
    shared_trunk: int = 0
    drop_probs: tuple[float, ...] = ()  # LayerDrop's p_l for layers 1..L
    seed: int = 0

    @classmethod
    def evaluation(cls) -> StepPlan:
        return cls(step=0, training=False)

    def dropped(self, micro: int) -> frozenset[int]:
        """1-based numbers of the layers LayerDrop skips in micro-batch `micro` (none in validation)."""
        if not self.training:
            return frozenset()
        return sample_dropped(list(self.drop_probs), self.seed, self.step, micro)

    def shared(self, micro: int) -> int:
        """Layers 1..n whose output states the teacher takes from the student in micro-batch `micro`: the shared
        trunk up to the layer below the first one LayerDrop skips (the student's states above it differ)."""
        dropped = self.dropped(micro)
        return next((n - 1 for n in range(1, self.shared_trunk + 1) if n in dropped), self.shared_trunk)
