"""SelfDistil-T losses as functions of tensors (and the tensor-parallel group the vocab is split over).

Logits are vocab-parallel ([b, s, V/tp] per rank): softmax statistics are reduced across the TP group
with autograd-aware all-reduces instead of gathering full logits. Every term is a mean over the
non-padding tokens (`loss_mask`), never a sum over positions.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


class LossWeights(Protocol):
    """The weights of the total loss (`DistillConfig` has them)."""

    lambda_kd: float
    lambda_sd: float


def combine_losses(lm_kd: torch.Tensor, align: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """The total loss LM + lambda_KD * KD + lambda_SD * alignment, formed here only: every layout (one
    micro-batch at a time, or the last pipeline stage) combines its terms with this. `lm_kd` is LM + lambda_KD
    * KD as the fused pass weighs it (`fused_lm_kd.lm_kd_losses`, with weights.lambda_kd): it folds KD's gradient
    into LM's, so that one [tokens, vocab] tensor is kept for backward, not two."""
    return lm_kd + weights.lambda_sd * align


def _local_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's slice of a [b, s, ...] tensor along the sequence (the slice megatron's SP scatter keeps)."""
    return x.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)]


def _masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def _tp_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def sequence_major(logits: torch.Tensor) -> bool:
    """Whether [b, s, V] logits are a view of an [s, b, V] tensor (the model's, `model/gpt.py`): a loss then
    takes the tokens in that order rather than copying the logits into [b, s] order (and their gradient back)."""
    return logits.dim() == 3 and not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Next-token cross-entropy over vocab-parallel logits, averaged over non-padding tokens."""
    swap = sequence_major(logits)
    z, y = (logits.transpose(0, 1), labels.transpose(0, 1)) if swap else (logits, labels)
    if _tp_size(tp_group) == 1:
        per_token = torch.nn.functional.cross_entropy(z.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    else:
        per_token = tensor_parallel.vocab_parallel_cross_entropy(z.float().contiguous(), y)
    # per-token values are the same either way; the mean sums them in [b, s] order as always
    return _masked_mean(per_token.transpose(0, 1).contiguous() if swap else per_token, loss_mask)


def _tp_log_softmax(z: torch.Tensor, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Local slice of log_softmax over a vocabulary split across the TP group."""
    if _tp_size(tp_group) == 1:
        return torch.log_softmax(z, dim=-1)
    zmax = z.detach().amax(dim=-1, keepdim=True)
    dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=tp_group)
    local = torch.exp(z - zmax).sum(dim=-1, keepdim=True)
    # Every rank's terms depend on the global sum, so its gradient must be summed over ranks too:
    # an all-reduce whose backward is an all-reduce (megatron's region op has an identity backward).
    total = dist_nn.all_reduce(local, group=tp_group)
    return z - zmax - torch.log(total)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor,
            temperature: float, tp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), averaged over non-padding tokens."""
    log_ps = _tp_log_softmax(student_logits.float() / temperature, tp_group)
    with torch.no_grad():
        log_pt = _tp_log_softmax(teacher_logits.float() / temperature, tp_group)
    local_kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1)
    kl = local_kl if _tp_size(tp_group) == 1 else reduce_from_tensor_model_parallel_region(local_kl, tp_group)
    return temperature**2 * _masked_mean(kl, loss_mask)


def align_loss(predictions: dict[int, torch.Tensor], teacher_hidden: dict[int, torch.Tensor],
               layer_map: dict[int, int], loss_mask: torch.Tensor,
               sp_group: dist.ProcessGroup | None = None, reduce: str = "sum",
               num_aligned: int | None = None) -> torch.Tensor:
    """Sum (or mean) over aligned layers l of mean_tokens(1 - cos(q_l(h_S^l), stopgrad h_T^{f(l)})).

    `predictions` holds q_l(h_S^l) ([s, b, d]) for the aligned layers that ran; `layer_map` is f.
    `reduce="mean"` divides the sum by the number of aligned layers that ran this step, so that the term's
    scale does not grow with depth or with kappa(t); `num_aligned` is that number when `predictions` holds
    only some of them (a pipeline stage's own layers), else len(predictions).
    `sp_group`: hidden states are split along the sequence across this (TP) group, [s/tp, b, d]; the
    token means are then taken over the whole sequence: local sums reduced over the group.
    """
    if sp_group is None:
        mask = loss_mask.transpose(0, 1)  # hidden states are [s, b, d]
        count = mask.sum()
    else:
        mask = _local_tokens(loss_mask, sp_group).transpose(0, 1)
        count = loss_mask.sum()  # every rank holds the whole [b, s] mask
    total = loss_mask.new_zeros(())
    for layer, pred in predictions.items():
        target = teacher_hidden[layer_map[layer]].detach()
        dtype = torch.promote_types(pred.dtype, torch.float32)  # at least fp32: bf16 states are upcast
        total = total + _CosineDistanceSum.apply(pred.to(dtype), target.to(dtype), mask, 1e-6)
    if sp_group is not None:
        # forward: sum of the ranks' token sums; backward: identity (each rank's tokens are its own)
        total = reduce_from_tensor_model_parallel_region(total, sp_group)
    total = total / count.clamp(min=1.0)
    if reduce == "mean":
        total = total / max(len(predictions) if num_aligned is None else num_aligned, 1)
    return total


class _CosineDistanceSum(torch.autograd.Function):
    """sum over tokens of w * (1 - cos(p, t)) along the last dimension, `t` a constant (the stop-gradient
    teacher state); `cosine_similarity`'s definition: x.y / (max(|x|, eps) max(|y|, eps)).

    The gradient in closed form, w * (cos p / (max(|p|, eps) |p|) - t / (max(|p|, eps) max(|t|, eps))) (as
    torch's autograd of `cosine_similarity` has it, also below eps), costs two passes over [tokens, d];
    autograd through `cosine_similarity` (norms, clamps, divisions, product, sum) takes several times that,
    once per aligned layer and step."""

    @staticmethod
    def forward(ctx, p: torch.Tensor, t: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        p_norm = torch.linalg.vector_norm(p, dim=-1)
        p_clamped = p_norm.clamp(min=eps)
        scale = p_clamped * torch.linalg.vector_norm(t, dim=-1).clamp_(min=eps)
        cos = torch.linalg.vecdot(p, t) / scale
        # d|p|/dp = p / |p|; a zero row (cos = 0) gets no p term, and dividing by 1 keeps it finite
        ctx.save_for_backward(p, t, w, cos, p_clamped * p_norm.masked_fill(p_norm == 0, 1.0), scale)
        return (w * (1.0 - cos)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        p, t, w, cos, p_norms, scale = ctx.saved_tensors
        gw = grad * w
        out = p * (gw * cos / p_norms).unsqueeze(-1)
        return out.addcmul_(t, (-gw / scale).unsqueeze(-1)), None, None, None
