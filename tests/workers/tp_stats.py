"""TP-aware evaluation statistics and training losses on real ranks: each rank holds a vocab slice of the same
logits; the statistics reduced over the TP group, the fused LM (alone and with KD) and each rank's slice of its
gradient must equal those of the full logits on one device.

usage: torchrun --nproc_per_node N tests/workers/tp_stats.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist

from sdt_dist.distill.fused_lm_kd import fused_lm_loss, lm_kd_losses
from sdt_dist.eval.metrics import EvalAccumulator, token_stats
from sdt_dist.parallel.dims import destroy_parallel, init_parallel


def main() -> None:
    dims = init_parallel(2, 1, 0)
    g = torch.Generator().manual_seed(0)
    vocab = 64
    results = {}
    for name, logits in {
        "random": torch.randn(3, 9, vocab, generator=g) * 4,
        "ties": torch.randint(-2, 2, (3, 9, vocab), generator=g).float(),  # maxima on both ranks
    }.items():
        labels = torch.randint(0, vocab, (3, 9), generator=g)
        width = vocab // dims.tp
        local = logits[..., dims.tp_rank * width : (dims.tp_rank + 1) * width]
        tp_stats = token_stats(local, labels, dims.tp_group)
        ref = token_stats(logits, labels)
        acc_tp, acc_ref = EvalAccumulator(), EvalAccumulator()
        acc_tp.update(tp_stats)
        acc_ref.update(ref)
        results[name] = {
            "nll_err": (tp_stats.nll - ref.nll).abs().max().item(),
            "conf_err": (tp_stats.confidence - ref.confidence).abs().max().item(),
            "correct_equal": bool(torch.equal(tp_stats.correct, ref.correct)),
            "ppl": [acc_tp.perplexity, acc_ref.perplexity],
            "ece": [acc_tp.ece, acc_ref.ece],
            "accuracy": [acc_tp.accuracy, acc_ref.accuracy],
        }
    results["losses"] = _losses(dims, g)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    destroy_parallel()


def _losses(dims, g: torch.Generator) -> dict[str, float]:
    """Largest error of the vocab-parallel fused losses (chunks of 4 tokens) and of this rank's gradient slice."""
    vocab, width = 64, 64 // dims.tp
    logits, teacher = torch.randn(9, 3, vocab, generator=g) * 4, torch.randn(3, 9, vocab, generator=g) * 4
    labels, mask = torch.randint(0, vocab, (3, 9), generator=g), torch.ones(3, 9)
    mask[1, 5:] = 0
    mine = slice(dims.tp_rank * width, (dims.tp_rank + 1) * width)
    errors = {}
    fns = {"lm": lambda z, t, grp: fused_lm_loss(z, labels, mask, grp, chunk_tokens=4),
           "lm_kd": lambda z, t, grp: lm_kd_losses(z, t, labels, mask, 2.0, 0.7, grp, chunk_tokens=4).weighted}
    for name, loss in fns.items():
        full = logits.clone().requires_grad_(True)
        ref = loss(full.transpose(0, 1), teacher, None)  # megatron's [s, b, V] seen as [b, s, V]
        ref.backward()
        local = logits[..., mine].clone().requires_grad_(True)
        got = loss(local.transpose(0, 1), teacher[..., mine], dims.tp_group)
        got.backward()
        errors[f"{name}_err"] = abs(got.item() - ref.item())
        errors[f"{name}_grad_err"] = (local.grad - full.grad[..., mine]).abs().max().item()
    return errors


if __name__ == "__main__":
    main()
