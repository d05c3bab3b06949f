"""The fused LM + KD pass (`sdt_dist/distill/fused_lm_kd.py`) against the separate losses, by chunk size, and
against the pass of another commit.

    python benchmarks/fused_loss.py [--vocab 8000] [--tokens 1024] [--threads 2] [--rounds 12] \
        [--chunks 16,19,21] [--against REV] [--device cuda --dtype bf16]

Forward and backward of LM + KD on [b, s, V] logits laid out as the model's ([s, b, V] in memory), the teacher a
perturbed student, T = 2; every arm in one process, interleaved, wall-clock medians after two warm-up rounds.
Arms: the separate `losses.lm_loss` + `losses.kd_loss` (autograd), the fused pass at each chunk size (2^k
elements per [chunk tokens, V] temporary), its default for the device, and with `--against REV` the fused pass
as commit REV had it (read with `git show`, at its own default chunk). Values are checked equal first. Each round
ends by reading the losses to the host, which waits for an accelerator's queued work. On a GPU, the chunk size to
measure is the accelerator default's (2^26, reasoned): e.g. `--device cuda --dtype bf16 --vocab 50304 --tokens
16384 --chunks 22,24,26,28` (gpt_125m's micro-batch).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdt_dist.distill import fused_lm_kd  # noqa: E402
from sdt_dist.distill.losses import kd_loss, lm_loss  # noqa: E402

TEMPERATURE = 2.0


def separate_lm_kd(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                   temperature: float, kd_weight: float, tp_group=None) -> fused_lm_kd.LmKd:
    """What the fused pass replaces, with `lm_kd_losses`' signature: `lm_loss` and `kd_loss` apart (autograd)."""
    lm, kd = lm_loss(logits, labels, mask, tp_group), kd_loss(logits, teacher_logits, mask, temperature, tp_group)
    return fused_lm_kd.LmKd(lm + kd_weight * kd, lm.detach(), kd.detach())


def fused_at(rev: str) -> Callable:
    """`lm_kd_losses` as commit `rev` wrote it."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:sdt_dist/distill/fused_lm_kd.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "fused_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fused_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lm_kd_losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per micro-batch (8 sequences)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--chunks", default="16,19,21", help="log2 of the chunk sizes to time")
    p.add_argument("--against", help="a commit whose fused pass to time too")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...: where the logits live")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the logits' dtype (bf16: a bf16 run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b = 8
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    z = (torch.randn(args.tokens // b, b, args.vocab, generator=g) * 3).transpose(0, 1)
    zt = (z + 0.3 * torch.randn(z.shape, generator=g)).to(args.device, dtype)
    z = z.to(args.device, dtype)  # keeps the [s, b, V] memory order
    labels = torch.randint(0, args.vocab, (b, args.tokens // b), generator=g).to(args.device)
    mask = torch.ones(b, args.tokens // b, device=args.device)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: the separate losses round in bf16

    # each arm: (LM + KD, LM, KD), LM + KD carrying the gradient
    def separate(x: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, ...]:
        return separate_lm_kd(x, zt, labels, mask, TEMPERATURE, 1.0)

    arms: dict[str, tuple[Callable, int | None]] = {"separate losses": (separate, None)}
    for k in (int(c) for c in args.chunks.split(",")):
        arms[f"fused, chunk 2^{k}"] = (lambda x, c: fused_lm_kd.lm_kd_losses(x, zt, labels, mask, TEMPERATURE, 1.0,
                                                                             chunk_tokens=c),
                                       max(1, 2**k // args.vocab))
    if args.against:
        old = fused_at(args.against)
        if "kd_weight" in inspect.signature(old).parameters:
            arms[f"fused as at {args.against}"] = (lambda x, c: tuple(old(x, zt, labels, mask, TEMPERATURE, 1.0)), None)
        else:  # before 2026-12-06's kd_weight the pass returned (LM, KD), both differentiable
            arms[f"fused as at {args.against}"] = (lambda x, c: (lambda lm, kd: (lm + kd, lm, kd))(
                *old(x, zt, labels, mask, TEMPERATURE)), None)

    def run(f: Callable, chunk: int | None) -> tuple[float, float]:
        x = z.detach().requires_grad_(True)
        total, lm, kd = f(x, chunk)
        total.backward()
        return lm.item(), kd.item()

    ref = run(*arms["separate losses"])
    for name, arm in arms.items():
        got = run(*arm)
        assert all(abs(a - r) <= tolerance * abs(r) + 1e-6 for a, r in zip(got, ref)), (name, got, ref)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        names = list(arms)[r % len(arms):] + list(arms)[:r % len(arms)]  # the order rotated each round
        for name in names:
            start = time.perf_counter()
            run(*arms[name])
            times[name].append(time.perf_counter() - start)
    default = fused_lm_kd.chunk_elements(z.device.type)
    print(f"V {args.vocab}, {args.tokens} tokens, {args.device} {args.dtype}, {args.threads} threads, "
          f"T = {TEMPERATURE}: forward + backward, "
          f"wall ms, median of rounds 3-{args.rounds}; this device's default chunk is 2^{default.bit_length() - 1}")
    base = statistics.median(times["separate losses"][2:])
    print("| arm | ms | vs separate |\n|---|---|---|")
    for name, ts in times.items():
        ms = statistics.median(ts[2:])
        print(f"| {name} | {ms * 1e3:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
