"""LM and KD losses in one pass over the logits, with their gradient in closed form (also the LM term alone).

Separately, `losses.lm_loss` and `losses.kd_loss` each take a log-softmax of the student's full-vocabulary
logits and autograd keeps three [tokens, vocab] tensors alive for backward (the two log-softmax outputs and
the teacher's probabilities). Here one pass, chunked over tokens so that temporaries stay bounded, computes
both losses and their weighted sum LM + lambda_KD * KD, whose gradient
  w * (softmax(z) - onehot(label)) + lambda_KD * w * T * (softmax(z / T) - softmax(z_T / T))
(w = loss mask / number of tokens) it keeps as one fp32 [tokens, vocab] tensor, the probabilities with the
KD term folded in at its weight, less the one-hot, which backward scatters into it in place. Per chunk, one
max per tensor serves both temperatures, and the KL is one dot product per token against log-sum-exps (no
[tokens, vocab] log-probabilities). Logits stay vocab-parallel under TP: the softmax statistics (max, sum
of exponentials, the label's logit, the KL dot product) are all-reduced over the TP group as plain values,
and the backward needs no communication (each rank's gradient is its own vocabulary slice).
Without KD (a plain step) the same pass keeps softmax(z) alone: against torch's cross-entropy (a log-softmax
kept for backward, then a zero-filled [tokens, vocab] gradient and the log-softmax's backward) half the time
at V = 8k and 32k (docs/performance.md).
Same values and gradient as `lm_loss` + lambda_KD * `kd_loss` up to float rounding
(tests/distill/test_fused_lm_kd.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from sdt_dist.distill.losses import sequence_major

# Elements of a [chunk tokens, vocab] fp32 temporary. On a CPU, chunks that stay near the cache are fastest:
# over V = 8k and 32k at 1 and 2 threads (1,024 tokens, forward and backward; benchmarks/fused_loss.py,
# docs/performance.md), 2^20 (4 MiB) took at most 1.20x the time of the fastest of 2^18-2^21 in each case,
# where 2^19 took up to 1.27x and 2^21 up to 1.31x. On an accelerator every chunk costs some 30 kernel launches,
# so there a chunk is as large as memory allows: 2^26 elements (256 MiB), at most 4 of them at once. That
# figure is reasoned, not measured (no GPU at hand).
CPU_CHUNK_ELEMENTS = 2**20
ACCELERATOR_CHUNK_ELEMENTS = 2**26


def chunk_elements(device_type: str) -> int:
    """Elements of one chunk temporary on a device of this type ("cpu", "cuda", ...)."""
    return CPU_CHUNK_ELEMENTS if device_type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.all_reduce(x, op=op, group=group)


class LmKd(NamedTuple):
    weighted: torch.Tensor  # LM + kd_weight * KD: the term that carries the gradient
    lm: torch.Tensor  # LM alone, a value (for the logs)
    kd: torch.Tensor  # T^2 * KL alone, a value (zero without a teacher)


class _LmKd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                loss_mask: torch.Tensor, temperature: float, kd_weight: float, tp_group: dist.ProcessGroup | None,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kd = teacher_logits is not None  # else the LM term alone (a plain step)
        ctx.swap = sequence_major(logits)
        if ctx.swap:
            logits, labels, loss_mask = (t.transpose(0, 1) for t in (logits, labels, loss_mask))
            teacher_logits = teacher_logits.transpose(0, 1) if kd else None
        vocab = logits.size(-1)
        z_all = logits.detach().reshape(-1, vocab)
        t_all = teacher_logits.detach().reshape(-1, vocab) if kd else None
        n = z_all.size(0)
        first = 0 if tp_group is None else dist.get_rank(tp_group) * vocab  # megatron's contiguous vocab split
        local = labels.reshape(-1) - first
        owned = (local >= 0) & (local < vocab)
        local = local.clamp(0, vocab - 1)
        mask = loss_mask.reshape(-1).float()
        # softmax(z) + kd_weight * T * (softmax(z / T) - softmax(z_T / T)): the gradient, less the one-hot
        grad = torch.empty(n, vocab, dtype=torch.float32, device=logits.device)
        lm_tok = torch.empty(n, dtype=torch.float32, device=logits.device)
        kl_tok = torch.zeros_like(lm_tok)
        inv_t, fold = 1.0 / temperature, kd_weight * temperature
        # the chunks' temporaries, allocated once: exp(z / T), exp(z_T / T), z_T - z, and fp32 copies of other logits
        casts = 0 if logits.dtype == torch.float32 else 1 + kd
        scratch = torch.empty(3 * kd + casts, min(n, chunk), vocab, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            tmp = scratch[:, :e - s]
            z = tmp[3 * kd].copy_(z_all[s:e]) if casts else z_all[s:e]
            t = (tmp[4].copy_(t_all[s:e]) if casts else t_all[s:e]) if kd else None
            # max(z / T) = max(z) / T: one max per tensor serves both temperatures (amax: max(-1) also finds
            # the indices, 7x slower)
            peak = torch.stack([z.amax(-1), t.amax(-1)]) if kd else z.amax(-1)[None]
            _all_reduce(peak, dist.ReduceOp.MAX, tp_group)
            p1 = torch.sub(z, peak[0, :, None], out=grad[s:e]).exp_()
            stats = [p1.sum(-1), z.gather(1, local[s:e, None]).squeeze(1) * owned[s:e]]
            if kd:
                es = torch.add(-inv_t * peak[0, :, None], z, alpha=inv_t, out=tmp[0]).exp_()  # exp(z/T - max/T)
                et = torch.add(-inv_t * peak[1, :, None], t, alpha=inv_t, out=tmp[1]).exp_()
                # KL(p_T || p_S) = sum_v p_T (z_T - z) / T - lse(z_T / T) + lse(z / T), with p_T = et / sum(et):
                # one dot product per token; the sums (and the dot) over this rank's vocabulary slice
                stats += [es.sum(-1), et.sum(-1), torch.sub(t, z, out=tmp[2]).mul_(et).sum(-1)]
            sums = torch.stack(stats)
            _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
            lm_tok[s:e] = peak[0] + sums[0].log() - sums[1]
            p1 /= sums[0, :, None]
            if kd:
                # lse(z / T) - lse(z_T / T), each term's max apart: their difference is small where the KL is
                kl_tok[s:e] = inv_t * (sums[4] / sums[3] + peak[0] - peak[1]) + (sums[2] / sums[3]).log()
                if fold:
                    p1.addcmul_(es, (fold / sums[2])[:, None]).addcmul_(et, (-fold / sums[3])[:, None])
        count = mask.sum().clamp(min=1.0)
        ctx.save_for_backward(local, owned, mask / count)
        ctx.grad, ctx.shape, ctx.dtype = grad, logits.shape, logits.dtype
        lm, kd_value = (lm_tok * mask).sum() / count, temperature**2 * (kl_tok * mask).sum() / count
        ctx.mark_non_differentiable(lm, kd_value)
        return lm + kd_weight * kd_value, lm, kd_value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, upstream: torch.Tensor, _lm: torch.Tensor, _kd: torch.Tensor):
        local, owned, w = ctx.saved_tensors
        grad = ctx.grad  # written in place: this backward runs once
        ctx.grad = None
        grad.mul_((upstream * w)[:, None])
        grad.scatter_add_(1, local[:, None], -(upstream * w * owned)[:, None])
        grad = grad.view(ctx.shape).to(ctx.dtype)
        return grad.transpose(0, 1) if ctx.swap else grad, None, None, None, None, None, None, None


def _chunk(logits: torch.Tensor, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, chunk_elements(logits.device.type) // logits.size(-1))


def _tp(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    return tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None


def lm_kd_losses(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                 temperature: float, kd_weight: float, tp_group: dist.ProcessGroup | None = None,
                 chunk_tokens: int | None = None) -> LmKd:
    """LM + kd_weight * T^2 * KL(softmax(z_T/T) || softmax(z_S/T)), with each term's value, each a mean over
    non-padding tokens, from vocab-parallel logits [b, s, V/tp]; the gradient (of `weighted`) reaches the student's
    logits only."""
    return LmKd(*_LmKd.apply(logits, teacher_logits, labels, loss_mask, temperature, kd_weight, _tp(tp_group),
                             _chunk(logits, chunk_tokens)))


def fused_lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                  tp_group: dist.ProcessGroup | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """The LM term of the same pass alone (a step without KD): `losses.lm_loss`'s value and gradient, in two
    passes over the logits forward and one backward, writing its gradient into the softmax it kept."""
    return _LmKd.apply(logits, None, labels, loss_mask, 1.0, 0.0, _tp(tp_group), _chunk(logits, chunk_tokens))[0]
