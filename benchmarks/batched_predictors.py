"""Issue 12's lever "predictors batched across layers", measured before taking it.

    python benchmarks/batched_predictors.py [--rounds 12] [--threads 1]

The alignment path of one micro-batch at both shapes of issue 12 (every layer aligned, as kappa(t) ends):
per layer the predictor q_l = Linear(d, d) - GELU - Linear(d, d) on the student's states and the cosine term
against the teacher's, forward and backward, done two ways in one process, interleaved, CPU-time medians:
  per layer: what `model/student.py` does (one small MLP per aligned layer);
  batched:   the layers' states and weights stacked, two `baddbmm` for all layers at once (the weights must
             be stacked every step, since each q_l is its own parameter).
Both give the same loss and gradients up to rounding (checked here before timing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {"small": (4, 8 * 128, 256), "large": (12, 4 * 256, 512)}  # (aligned layers, tokens, d)
F = torch.nn.functional


def make(n: int, tokens: int, d: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 1.0, grad: bool = True) -> list[torch.Tensor]:
        return [(torch.randn(*shape, generator=g) * std).requires_grad_(grad) for _ in range(n)]

    return {"h": rand(tokens, d), "w1": rand(d, d, std=0.02), "b1": rand(d, std=0.02), "w2": rand(d, d, std=0.02),
            "b2": rand(d, std=0.02), "target": rand(tokens, d, grad=False)}


def per_layer(t: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    loss = 0.0
    for h, w1, b1, w2, b2, target in zip(t["h"], t["w1"], t["b1"], t["w2"], t["b2"], t["target"]):
        p = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2)
        loss = loss + (1 - F.cosine_similarity(p, target, dim=-1)).mean()
    return loss / len(t["h"])


def batched(t: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    h, w1, w2 = torch.stack(t["h"]), torch.stack(t["w1"]), torch.stack(t["w2"])
    x = torch.baddbmm(torch.stack(t["b1"]).unsqueeze(1), h, w1.transpose(1, 2))
    p = torch.baddbmm(torch.stack(t["b2"]).unsqueeze(1), F.gelu(x), w2.transpose(1, 2))
    return (1 - F.cosine_similarity(p, torch.stack(t["target"]), dim=-1)).mean()


def grads(fn, t: dict[str, list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x for k in ("h", "w1", "b1", "w2", "b2") for x in t[k]]
    loss = fn(t)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"alignment path, forward + backward, {args.threads} threads, CPU-time medians of rounds "
          f"{args.warmup + 1}-{args.rounds}")
    print("| shape | aligned layers x tokens x d | per layer ms | batched ms | batched / per layer |")
    print("|---|---|---|---|---|")
    for shape, (n, tokens, d) in SHAPES.items():
        t = make(n, tokens, d)
        (la, ga), (lb, gb) = grads(per_layer, t), grads(batched, t)
        torch.testing.assert_close(la, lb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        times: dict[str, list[float]] = {"per layer": [], "batched": []}
        arms = {"per layer": per_layer, "batched": batched}
        for r in range(args.rounds):
            for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                c0 = time.process_time()
                grads(arms[name], t)
                times[name].append(time.process_time() - c0)
        a, b = (statistics.median(times[k][args.warmup:]) for k in ("per layer", "batched"))
        print(f"| {shape} | {n} x {tokens} x {d} | {a * 1e3:,.1f} | {b * 1e3:,.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
