"""Perplexity and calibration statistics as pure functions of (vocab-parallel) logits.

Logits may be split over the vocabulary across a tensor-parallel group ([b, s, V/tp] per rank, rank r
holding ids [r*V/tp, (r+1)*V/tp)), exactly as the model emits them. Only per-token scalars are reduced
across the group (max, sum of exponentials, the label's logit, the argmax index): full logits are never
gathered. With `tp_group=None` (or a group of one) the same code is plain single-device math.

ECE follows Guo et al. (2017): top-1 confidence (max softmax probability) of each next-token prediction,
M equal-width bins ((m-1)/M, m/M] (a confidence of exactly 0 goes to the first bin), and
ECE = sum_m (n_m / N) * |accuracy_m - mean confidence_m|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

DEFAULT_BINS = 10


class TokenStats(NamedTuple):
    nll: torch.Tensor  # [b, s] -log p(label), float32
    confidence: torch.Tensor  # [b, s] max_v p(v), float32
    correct: torch.Tensor  # [b, s] bool: argmax == label (ties -> the smallest id, like torch.argmax)


def _tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor, tp_group: dist.ProcessGroup | None = None) -> TokenStats:
    """Per-token NLL, top-1 confidence and top-1 correctness from logits [b, s, V/tp]; labels [b, s]."""
    z = logits.float()
    tp = _tp_size(tp_group)
    width = z.size(-1)
    start = 0 if tp == 1 else dist.get_rank(tp_group) * width

    local_max, local_arg = z.max(dim=-1)
    zmax = local_max.clone()
    if tp > 1:
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp = torch.exp(z - zmax.unsqueeze(-1)).sum(dim=-1)
    # The label's logit lives on exactly one rank: the others contribute 0 to the sum.
    owned = (labels >= start) & (labels < start + width)
    label_logit = z.gather(-1, (labels - start).clamp(0, width - 1).unsqueeze(-1)).squeeze(-1) * owned
    # Global argmax: the smallest global id among the ranks holding the global max.
    arg = torch.where(local_max == zmax, local_arg + start, torch.full_like(local_arg, torch.iinfo(torch.int64).max))
    if tp > 1:
        dist.all_reduce(sumexp, group=tp_group)
        dist.all_reduce(label_logit, group=tp_group)
        dist.all_reduce(arg, op=dist.ReduceOp.MIN, group=tp_group)
    log_z = zmax + torch.log(sumexp)
    # softmax max = exp(zmax) / sum exp = 1 / sum exp(z - zmax)
    return TokenStats(nll=log_z - label_logit, confidence=sumexp.reciprocal(), correct=arg == labels)


def bin_index(confidence: torch.Tensor, n_bins: int = DEFAULT_BINS) -> torch.Tensor:
    """Bin m (0-based) of ((m)/M, (m+1)/M]; confidence 0 -> bin 0."""
    return (torch.ceil(confidence.double() * n_bins).long() - 1).clamp(0, n_bins - 1)


@dataclass
class EvalAccumulator:
    """Running sums over scored tokens: total NLL, and per confidence bin the count, the sum of
    confidences and the number of correct predictions. Sums (float64) merge exactly across batches and
    data-parallel ranks, so perplexity and ECE are over the whole set, not averages of batch values."""

    n_bins: int = DEFAULT_BINS
    nll_sum: float = 0.0
    tokens: int = 0
    bin_count: torch.Tensor = field(init=False)
    bin_confidence: torch.Tensor = field(init=False)
    bin_correct: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.bin_count, self.bin_confidence, self.bin_correct = torch.zeros(3, self.n_bins, dtype=torch.float64)

    def update(self, stats: TokenStats, loss_mask: torch.Tensor | None = None) -> None:
        keep = torch.ones_like(stats.nll, dtype=torch.bool) if loss_mask is None else loss_mask.bool()
        nll, conf, correct = stats.nll[keep].double(), stats.confidence[keep].double(), stats.correct[keep].double()
        self.nll_sum += nll.sum().item()
        self.tokens += int(keep.sum().item())
        idx = bin_index(conf, self.n_bins).cpu()
        self.bin_count += torch.bincount(idx, minlength=self.n_bins).double()
        self.bin_confidence += torch.bincount(idx, weights=conf.cpu(), minlength=self.n_bins)
        self.bin_correct += torch.bincount(idx, weights=correct.cpu(), minlength=self.n_bins)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum over data-parallel ranks that scored disjoint tokens (collective)."""
        flat = torch.cat([torch.tensor([self.nll_sum, float(self.tokens)], dtype=torch.float64),
                          self.bin_count, self.bin_confidence, self.bin_correct])
        dist.all_reduce(flat, group=group)
        self.nll_sum, self.tokens = flat[0].item(), int(flat[1].item())
        self.bin_count, self.bin_confidence, self.bin_correct = flat[2:].split(self.n_bins)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    @property
    def accuracy(self) -> float:
        return self.bin_correct.sum().item() / max(self.tokens, 1)

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.bin_count, self.bin_confidence, self.bin_correct)

    def bins(self) -> list[dict[str, Any]]:
        """Per bin: its interval, count, mean confidence and accuracy (None when empty)."""
        out = []
        for m in range(self.n_bins):
            n = self.bin_count[m].item()
            out.append({"lo": m / self.n_bins, "hi": (m + 1) / self.n_bins, "count": int(n),
                        "confidence": self.bin_confidence[m].item() / n if n else None,
                        "accuracy": self.bin_correct[m].item() / n if n else None})
        return out


def expected_calibration_error(count: torch.Tensor, confidence_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    """sum_m (n_m / N) |acc_m - conf_m| = (1/N) sum_m |correct_m - confidence_sum_m|, from per-bin sums."""
    total = count.sum().item()
    if total == 0:
        return 0.0
    return (correct_sum.double() - confidence_sum.double()).abs().sum().item() / total


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE of top-1 predictions given as flat confidences and correctness flags."""
    acc = EvalAccumulator(n_bins)
    conf = confidence.reshape(-1)
    acc.update(TokenStats(nll=torch.zeros_like(conf), confidence=conf, correct=correct.reshape(-1).bool()))
    return acc.ece
