"""LM and KD losses in one pass over the logits, with their gradient in closed form.

Separately, `losses.lm_loss` and `losses.kd_loss` each take a log-softmax of the student's full-vocabulary
logits and autograd keeps three [tokens, vocab] tensors alive for backward (the two log-softmax outputs and
the teacher's probabilities). Here one pass, chunked over tokens so that temporaries stay bounded, computes
both losses and keeps only what their gradients need:
  d LM / dz = w * (softmax(z) - onehot(label)),  d KD / dz = w * T * (softmax(z / T) - softmax(z_T / T))
(w = loss mask / number of tokens), i.e. softmax(z) and the probability difference: two tensors, written
in place into one gradient in backward. Logits stay vocab-parallel under TP: the softmax statistics (max,
sum of exponentials, the label's logit, the KL partial sums) are all-reduced over the TP group as plain
values, and the backward needs no communication (each rank's gradient is its own vocabulary slice).
Same values as `lm_loss` and `kd_loss` up to float rounding (tests/distill/test_fused_lm_kd.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sdt_dist.distill.losses import sequence_major

# elements of a [chunk tokens, vocab] fp32 temporary (8 MiB): bounded memory, and faster than whole-tensor
# passes on a CPU (measured: chunks of 2^21 elements took about half the CPU time of the separate losses,
# 2^23 more than them, at V = 8k and 32k)
CHUNK_ELEMENTS = 2**21


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


class _LmKd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor, temperature: float, tp_group: dist.ProcessGroup | None,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.swap = sequence_major(logits)
        if ctx.swap:
            logits, teacher_logits, labels, loss_mask = (t.transpose(0, 1) for t in (logits, teacher_logits, labels,
                                                                                     loss_mask))
        vocab = logits.size(-1)
        z_all, t_all = logits.detach().reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
        n = z_all.size(0)
        first = 0 if tp_group is None else dist.get_rank(tp_group) * vocab  # megatron's contiguous vocab split
        local = labels.reshape(-1) - first
        owned = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1)
        mask = loss_mask.reshape(-1).float()
        p1 = torch.empty(n, vocab, dtype=torch.float32, device=logits.device)  # softmax(z)
        diff = torch.empty_like(p1)  # softmax(z / T) - softmax(z_T / T)
        lm_tok = torch.empty(n, dtype=torch.float32, device=logits.device)
        kl_tok = torch.empty_like(lm_tok)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            z = z_all[s:e].float()
            zs, zt = z / temperature, t_all[s:e].float() / temperature
            peak = torch.stack([z.max(-1).values, zs.max(-1).values, zt.max(-1).values])
            _all_reduce(peak, dist.ReduceOp.MAX, tp_group)
            torch.exp(z - peak[0, :, None], out=p1[s:e])
            torch.exp(zs - peak[1, :, None], out=diff[s:e])
            et = torch.exp(zt - peak[2, :, None])
            target = z.gather(1, local[s:e, None]).squeeze(1) * owned[s:e]
            sums = torch.stack([p1[s:e].sum(-1), diff[s:e].sum(-1), et.sum(-1), target])
            _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
            lse = peak + sums[:3].log()  # log-sum-exp of z, z/T, z_T/T
            lm_tok[s:e] = lse[0] - sums[3]
            p1[s:e] /= sums[0, :, None]
            pt = et.div_(sums[2, :, None])
            # KL(p_T || p_S) = sum_v p_T * (log p_T - log p_S), as kd_loss takes it (this rank's vocabulary)
            kl_tok[s:e] = (pt * ((zt - lse[2, :, None]) - (zs - lse[1, :, None]))).sum(-1)
            diff[s:e].div_(sums[1, :, None]).sub_(pt)
        _all_reduce(kl_tok, dist.ReduceOp.SUM, tp_group)
        count = mask.sum().clamp(min=1.0)
        ctx.save_for_backward(local, owned, mask / count)
        ctx.p1, ctx.diff, ctx.temperature, ctx.shape = p1, diff, temperature, logits.shape
        ctx.dtype = logits.dtype
        return (lm_tok * mask).sum() / count, temperature**2 * (kl_tok * mask).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lm: torch.Tensor, grad_kd: torch.Tensor):
        local, owned, w = ctx.saved_tensors
        grad = ctx.p1  # reused in place: this backward runs once
        grad.mul_((grad_lm * w)[:, None])
        grad.add_(ctx.diff.mul_((grad_kd * ctx.temperature * w)[:, None]))
        grad.scatter_add_(1, local[:, None], -(grad_lm * w * owned)[:, None])
        ctx.p1 = ctx.diff = None
        grad = grad.view(ctx.shape).to(ctx.dtype)
        return grad.transpose(0, 1) if ctx.swap else grad, None, None, None, None, None, None


def lm_kd_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                 temperature: float, tp_group: dist.ProcessGroup | None = None,
                 chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM, T^2 * KL(softmax(z_T/T) || softmax(z_S/T))), each a mean over non-padding tokens, from vocab-parallel
    logits [b, s, V/tp]; the gradient reaches the student's logits only."""
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // logits.size(-1))
    return _LmKd.apply(logits, teacher_logits, labels, loss_mask, temperature, group, chunk)
