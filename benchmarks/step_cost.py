"""Cost of a SelfDistil-T step against a plain step and against plain PyTorch, measured side by side.

    python benchmarks/step_cost.py --shape small [--steps 30] [--threads 2] [--set distill.x=y ...]
    python benchmarks/step_cost.py --shape large --steps 16
    python benchmarks/step_cost.py --trunk --set distill.freeze_embedding=true   # shared frozen trunk on vs off

One process holds every arm and runs them interleaved (one step of each arm per round, the arm order
rotated every round), so that a busy machine slows all arms alike; times are medians over the rounds
after the first `--warmup`. Arms:
  peer plain / peer naive SD: Hugging Face `GPTNeoXForCausalLM` of the same shape (exactly this
    architecture), torch AdamW (its default kernel; also a plain arm with the fused kernel ours uses by
    default), gradient clipping; naive SD adds a teacher forward under no_grad, the
    T^2 KL term and a `torch._foreach_lerp_` EMA.
  ours: the real `SDTrainModule` + `train_step` on one rank (DeepSpeed engine, ZeRO-0, fp32, dropout 0):
    plain (the GPT-baseline arm: no KD, no alignment, no freezing, no LayerDrop), SD without freezing or
    LayerDrop, the same without alignment (what the predictors and cosine terms cost), and one arm per
    stage of the freezing schedule (with its LayerDrop), each run at the step indices of its stage of a
    nominal `--run-steps` run, so that kappa(t), tau, the frozen count and the LayerDrop draws are the
    schedule's. The schedule-averaged ratio weights the stages by their length.
Each of ours is also given as FLOPs over ours plain (`sdt_dist/eval/compute.py`, over the steps it ran): the
ratio the arithmetic sets, that no implementation beats without computing less.
The EMA share is the teacher update timed on its own (same rounds) over the SD step. Peak memory (plain
vs SD without freezing) is measured in a fresh process per arm: the accelerator's peak allocation, or on
CPU the peak resident set size (VmHWM, reset just before the measured step) above the resident size
before it. Batches are random tokens (the step's cost does not depend on them; the data loader is not
part of the measured step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sdt_dist.config import Config, load_config  # noqa: E402
from sdt_dist.distill.schedules import frozen_layers_at  # noqa: E402

# the two shapes of issue 12, and a tiny one that only checks that the script runs (tests/test_benchmarks.py)
SHAPES = {
    "small": ["model.num_layers=4", "model.hidden_size=256", "model.num_attention_heads=4",
              "model.vocab_size=8000", "model.seq_length=128", "train.micro_batch_size=8",
              "train.global_batch_size=8"],
    "large": ["model.num_layers=12", "model.hidden_size=512", "model.num_attention_heads=8",
              "model.vocab_size=32000", "model.seq_length=256", "train.micro_batch_size=4",
              "train.global_batch_size=4"],
    "tiny": ["model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.vocab_size=256",
             "model.seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2"],
}
COMMON = ["model.dropout=0", "model.tie_embeddings=false", "parallel.zero_stage=0", "parallel.ds_config=null",
          "data.prepared=[unused]", "train.warmup_steps=0"]
PLAIN = ["distill.lambda_kd=0", "distill.lambda_sd=0", "distill.freeze_milestones=[]",
         "distill.freeze_fractions=[]", "distill.layerdrop_p=0"]
# the schedule issue 12 measures (the paper's: 10/20/30% of layers at 10/20/30% of steps, LayerDrop 0.1),
# whatever DistillConfig's defaults; PLAIN and NO_FREEZE switch it off
SCHEDULE = ["distill.freeze_milestones=[0.1, 0.2, 0.3]", "distill.freeze_fractions=[0.1, 0.2, 0.3]",
            "distill.layerdrop_p=0.1"]
NO_FREEZE = ["distill.freeze_milestones=[]", "distill.freeze_fractions=[]", "distill.layerdrop_p=0"]
SD, EMA = "ours SD, no freezing, no LayerDrop", "EMA update alone (SD arm)"
PEER_FUSED = "peer plain, fused AdamW (ours' default kernel)"
KD_ONLY = "ours SD without alignment (EMA teacher + KD), no freezing, no LayerDrop"


def make_cfg(args: argparse.Namespace, *extra: str) -> Config:
    return load_config(None, [*SHAPES[args.shape], *COMMON, *SCHEDULE, f"train.max_steps={args.run_steps}",
                              *args.set, *extra])


def random_batch(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_length + 1),
                         generator=g)
    return {"tokens": toks[:, :-1], "labels": toks[:, 1:],
            "loss_mask": torch.ones(cfg.train.micro_batch_size, cfg.model.seq_length)}


# -- the peer: plain PyTorch + Hugging Face -----------------------------------------------------------------
def peer_arm(cfg: Config, naive_sd: bool, fused: bool = False) -> Callable[[dict[str, torch.Tensor], int], None]:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m, t, d = cfg.model, cfg.train, cfg.distill
    hf = GPTNeoXConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                       num_attention_heads=m.num_attention_heads, intermediate_size=4 * m.hidden_size,
                       hidden_act="gelu", rotary_pct=1.0, rotary_emb_base=m.rope_base,
                       max_position_embeddings=m.seq_length, layer_norm_eps=1e-5, use_parallel_residual=False,
                       tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, hidden_dropout=0.0,
                       initializer_range=m.init_std)
    torch.manual_seed(t.seed)
    model = GPTNeoXForCausalLM._from_config(hf, attn_implementation="sdpa").train()
    # torch's default kernel (for-loop on CPU, foreach on CUDA) unless `fused`, which ours uses by default
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                            fused=fused or None)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if naive_sd else None
    s_params, t_params = list(model.parameters()), list(teacher.parameters()) if teacher else []
    temp = d.temperature

    def step(batch: dict[str, torch.Tensor], _step: int) -> None:
        logits = model(batch["tokens"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(batch["tokens"]).logits
            log_s, log_t = torch.log_softmax(logits / temp, -1), torch.log_softmax(t_logits / temp, -1)
            kl = torch.nn.functional.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean()
            loss = loss + d.lambda_kd * temp**2 * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if teacher is not None:
            with torch.no_grad():
                torch._foreach_lerp_(t_params, s_params, 1.0 - d.ema_tau)
        loss.item()  # the loss is logged every step, as ours is

    return step


# -- ours: the real train module and step ------------------------------------------------------------------
def our_arm(cfg: Config, window: tuple[int, int] | None, frozen: int = 0):
    """A train module and a step function that runs `train_step` at the step indices of `window`
    (cycled; the window's last step is left out so that no milestone is crossed inside the arm)."""
    from sdt_dist.parallel.dims import init_parallel
    from sdt_dist.train_module import SDTrainModule
    from sdt_dist.train_step import train_step

    dims = init_parallel(1, 1, cfg.parallel.zero_stage)
    tm = SDTrainModule(cfg, dims)
    if frozen:
        tm.freeze(frozen, carry_state=False)
    lo, hi = window or (0, cfg.train.max_steps)
    span = max(1, hi - lo - 1)

    def step(batch: dict[str, torch.Tensor], i: int) -> None:
        s = lo + (i * 7) % span  # stride 7: spread over the window in few steps
        res = train_step(tm, [batch], s)
        step.ran.append((s, res.frozen_layers, res.shared_trunk))

    step.ran = []  # (step, frozen, shared trunk) of every call, for the FLOP count
    return tm, step


def flops_per_step(cfg: Config, ran: list[tuple[int, int, int]]) -> float:
    """Mean training FLOPs (`eval/compute.py`: matmuls, predictors included) of the steps an arm ran."""
    from sdt_dist.eval.compute import layer_params, step_flops

    per_layer = layer_params(cfg.model)
    return statistics.mean(step_flops(cfg, per_layer, 1, s, k, shared) for s, k, shared in ran)


def stages(cfg: Config) -> list[tuple[int, int, int]]:
    """(first step, end step, frozen layers) of each stage of the freezing schedule."""
    d, n, total = cfg.distill, cfg.model.num_layers, cfg.train.max_steps
    out: list[tuple[int, int, int]] = []
    for s in range(total):
        k = frozen_layers_at(s, d, n, total)
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], s + 1, k)
        else:
            out.append((s, s + 1, k))
    return out


def interleaved(arms: dict[str, Callable[[dict[str, torch.Tensor], int], None]], batches: list,
                warmup: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall-clock and median process CPU time per arm (CPU time is less disturbed by other
    processes on a shared machine; with several threads it also counts their spin-waiting)."""
    wall: dict[str, list[float]] = {name: [] for name in arms}
    cpu: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r, batch in enumerate(batches):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            arms[name](batch, r)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"  round {r + 1}/{len(batches)} (wall ms): " + ", ".join(f"{n} {wall[n][-1] * 1e3:.0f}" for n in names),
              file=sys.stderr, flush=True)
    return ({n: statistics.median(ts[warmup:]) for n, ts in wall.items()},
            {n: statistics.median(ts[warmup:]) for n, ts in cpu.items()})


# -- peak memory, one fresh process per arm ----------------------------------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args: argparse.Namespace) -> None:
    """(child process) Peak memory of one step of arm `args.memory_arm`, printed as JSON."""
    from deepspeed.accelerator import get_accelerator

    cfg = make_cfg(args, *(PLAIN if args.memory_arm == "plain" else NO_FREEZE))
    _, step = our_arm(cfg, None)
    batch = random_batch(cfg, 0)
    for i in range(2):
        step(batch, i)
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that RSS is what is live
        before = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
        step(batch, 2)
        peak = _rss_kib("VmHWM")
        out = {"kind": "RSS", "before_mib": before / 1024, "peak_mib": peak / 1024}
    else:
        before = acc.memory_allocated()
        acc.reset_peak_memory_stats()
        step(batch, 2)
        out = {"kind": "allocated", "before_mib": before / 2**20, "peak_mib": acc.max_memory_allocated() / 2**20}
    print(json.dumps(out))


def memory(args: argparse.Namespace, arm: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--shape", args.shape, "--threads", str(args.threads),
           "--run-steps", str(args.run_steps), "--memory-arm", arm] + [f"--set={s}" for s in args.set]
    # a rank of its own: this process's rendezvous (its MASTER_PORT among them) would collide with the child's
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def levers(args: argparse.Namespace) -> None:
    """Plain step with DeepSpeed's gradient all-reduce restored, with torch's CPU default AdamW kernel, with
    torch's cross-entropy for the LM term; SD step with the separate LM and KD losses restored; each against the
    same step with the lever (one process, interleaved)."""
    from fused_loss import separate_lm_kd

    import sdt_dist.train_module as ts
    from sdt_dist.distill import losses

    cfg = make_cfg(args)
    arms: dict[str, Callable] = {"peer plain": peer_arm(cfg, False)}
    _, arms["ours plain"] = our_arm(make_cfg(args, *PLAIN), None)
    tm, plain_ds = our_arm(make_cfg(args, *PLAIN), None)
    del tm.engine.allreduce_gradients  # the instance override: DeepSpeed's own method again
    arms["ours plain, DeepSpeed all-reduce at DP=1"] = plain_ds
    _, arms["ours plain, for-loop AdamW"] = our_arm(make_cfg(args, *PLAIN, "train.optimizer_impl=for-loop"), None)

    def replaced(step: Callable, name: str, stand_in: Callable) -> Callable:
        """`step` with train_module's function `name` replaced by `stand_in` (the lever off) while it runs."""
        def run(batch: dict[str, torch.Tensor], i: int) -> None:
            kept = getattr(ts, name)
            setattr(ts, name, stand_in)
            try:
                step(batch, i)
            finally:
                setattr(ts, name, kept)
        return run

    _, plain = our_arm(make_cfg(args, *PLAIN), None)
    arms["ours plain, torch cross-entropy"] = replaced(plain, "fused_lm_loss", losses.lm_loss)
    _, arms["ours SD"] = our_arm(make_cfg(args, *NO_FREEZE), None)
    _, sd = our_arm(make_cfg(args, *NO_FREEZE), None)
    arms["ours SD, separate LM and KD losses"] = replaced(sd, "lm_kd_losses", separate_lm_kd)
    med, cpu = interleaved(arms, [random_batch(cfg, 1000 + r) for r in range(args.steps)], args.warmup)
    print(f"levers, shape {args.shape}, {args.threads} threads, median of rounds {args.warmup + 1}-{args.steps}")
    print("| arm | wall ms/step | CPU ms/step |\n|---|---|---|")
    for name in arms:
        print(f"| {name} | {med[name] * 1e3:,.0f} | {cpu[name] * 1e3:,.0f} |")
    for off, on in (("ours plain, DeepSpeed all-reduce at DP=1", "ours plain"),
                    ("ours plain, for-loop AdamW", "ours plain"),
                    ("ours plain, torch cross-entropy", "ours plain"),
                    ("ours SD, separate LM and KD losses", "ours SD")):
        print(f"{off} / with the lever: wall {med[off] / med[on]:.3f}, CPU {cpu[off] / cpu[on]:.3f}")


def trunk(args: argparse.Namespace) -> None:
    """Each frozen stage of the schedule with the shared frozen trunk on and off (one process, interleaved)."""
    cfg = make_cfg(args)
    if not cfg.distill.freeze_embedding:
        raise SystemExit("--trunk: the trunk is shared only with --set distill.freeze_embedding=true")
    arms: dict[str, Callable] = {}
    _, arms["ours plain"] = our_arm(make_cfg(args, *PLAIN), None)
    pairs = []
    for lo, hi, k in stages(cfg):
        if k:
            name = f"ours SD, steps {lo}-{hi - 1}: {k} frozen, LayerDrop {cfg.distill.layerdrop_p:g}"
            for share in ("true", "false"):
                _, arms[f"{name}, trunk shared {share}"] = our_arm(
                    make_cfg(args, f"distill.share_frozen_trunk={share}"), (lo, hi), k)
            pairs.append(name)
    med, cpu = interleaved(arms, [random_batch(cfg, 1000 + r) for r in range(args.steps)], args.warmup)
    print(f"shared frozen trunk, shape {args.shape}, {args.threads} threads, median of rounds "
          f"{args.warmup + 1}-{args.steps}")
    print("| arm | wall ms/step | CPU ms/step |\n|---|---|---|")
    for name in arms:
        print(f"| {name} | {med[name] * 1e3:,.0f} | {cpu[name] * 1e3:,.0f} |")
    for name in pairs:
        on, off = f"{name}, trunk shared true", f"{name}, trunk shared false"
        print(f"{name}: shared / recomputed: wall {med[on] / med[off]:.3f}, CPU {cpu[on] / cpu[off]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=30, help="measured rounds, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first rounds left out of the medians")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-steps", type=int, default=100, help="nominal run length the schedule is laid on")
    parser.add_argument("--set", action="append", default=[], help="config override for every arm of ours")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--arms", choices=["all", "core", "stages"], default="all",
                        help="core: peers, ours plain and SD without freezing, EMA; stages: ours plain and the "
                             "schedule's stages (each arm holds a model, optimizer and teacher: split a large shape "
                             "over two runs where memory is short)")
    parser.add_argument("--levers", action="store_true",
                        help="instead: each lever of issue 12 switched off against on, in one process")
    parser.add_argument("--trunk", action="store_true",
                        help="instead: each frozen stage with the shared frozen trunk on and off, in one process "
                             "(with --set distill.freeze_embedding=true)")
    parser.add_argument("--memory-arm", choices=["plain", "sd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_arm:
        measure_memory(args)
        return
    args.warmup = min(args.warmup, args.steps - 1)
    if args.levers:
        levers(args)
        return
    if args.trunk:
        trunk(args)
        return

    sd_cfg = make_cfg(args)
    core, staged = args.arms in ("all", "core"), args.arms in ("all", "stages")
    arms: dict[str, Callable] = {}
    if core:
        arms.update({"peer plain": peer_arm(sd_cfg, False), "peer naive SD": peer_arm(sd_cfg, True),
                     PEER_FUSED: peer_arm(sd_cfg, False, fused=True)})
    cfgs = {"ours plain": make_cfg(args, *PLAIN)}
    _, arms["ours plain"] = our_arm(cfgs["ours plain"], None)
    if core:
        cfgs[SD], cfgs[KD_ONLY] = make_cfg(args, *NO_FREEZE), make_cfg(args, *NO_FREEZE, "distill.lambda_sd=0")
        sd_tm, arms[SD] = our_arm(cfgs[SD], None)
        _, arms[KD_ONLY] = our_arm(cfgs[KD_ONLY], None)
        tau = sd_cfg.distill.ema_tau

        def ema(_batch: dict[str, torch.Tensor], _i: int) -> None:
            sd_tm.teacher.update(sd_tm.student_gpt_params(), tau, sd_tm.frozen_indices())

        arms[EMA] = ema
    plan = stages(sd_cfg) if staged else []
    stage_names = []
    for lo, hi, k in plan:
        name = f"ours SD, steps {lo}-{hi - 1}: {k} frozen, LayerDrop {sd_cfg.distill.layerdrop_p:g}"
        _, arms[name] = our_arm(sd_cfg, (lo, hi), k)
        cfgs[name] = sd_cfg
        stage_names.append(name)
    batches = [random_batch(sd_cfg, 1000 + r) for r in range(args.steps)]
    med, cpu = interleaved(arms, batches, args.warmup)

    m = sd_cfg.model
    print(f"shape {args.shape}: {m.num_layers} layers, d {m.hidden_size}, {m.num_attention_heads} heads, vocab "
          f"{m.vocab_size}, seq {m.seq_length}, micro-batch {sd_cfg.train.micro_batch_size}; fp32, ZeRO-0, dropout 0, "
          f"{args.threads} threads; median of rounds {args.warmup + 1}-{args.steps}, all arms interleaved in one "
          f"process; schedule laid on a {args.run_steps}-step run")
    ref = "peer plain" if core else "ours plain"
    # the arithmetic floor of each ratio: FLOPs of the steps the arm ran over ours plain's
    flops = {name: flops_per_step(cfg, arms[name].ran[args.warmup:]) for name, cfg in cfgs.items()}
    print(f"| arm | wall ms/step | vs {ref} | vs ours plain | CPU ms/step | vs {ref} | vs ours plain | "
          "FLOPs vs ours plain |\n|---|---|---|---|---|---|---|---|")
    for name in arms:
        if name != EMA:
            w, c = med[name], cpu[name]
            f = f"{flops[name] / flops['ours plain']:.2f}" if name in flops else ""
            print(f"| {name} | {w * 1e3:,.0f} | {w / med[ref]:.2f} | {w / med['ours plain']:.2f} | "
                  f"{c * 1e3:,.0f} | {c / cpu[ref]:.2f} | {c / cpu['ours plain']:.2f} | {f} |")
    weights = [(hi - lo) / sd_cfg.train.max_steps for lo, hi, _ in plan]
    for label, t in (("wall", med), ("CPU", cpu)) if staged else ():
        averaged = sum(w * t[n] for w, n in zip(weights, stage_names))
        print(f"schedule-averaged SD step ({label}): {averaged * 1e3:,.0f} ms = {averaged / t['ours plain']:.2f}x "
              f"ours plain (stages weighted {', '.join(f'{w:.2f}' for w in weights)})")
    if staged:
        averaged = sum(w * flops[n] for w, n in zip(weights, stage_names))
        print(f"schedule-averaged SD step (FLOPs): {averaged / flops['ours plain']:.2f}x ours plain")
    if core:
        print(f"EMA update: {med[EMA] * 1e3:.2f} ms wall = {100 * med[EMA] / med[SD]:.2f}% of the SD step (no "
              f"freezing); CPU {100 * cpu[EMA] / cpu[SD]:.2f}%")
    if not args.no_memory:
        mem = {arm: memory(args, arm) for arm in ("plain", "sd")}
        p, s = mem["plain"], mem["sd"]
        print(f"peak memory ({p['kind']}, one step, fresh process each): plain {p['peak_mib']:,.0f} MiB "
              f"(+{p['peak_mib'] - p['before_mib']:,.0f} during the step), SD {s['peak_mib']:,.0f} MiB "
              f"(+{s['peak_mib'] - s['before_mib']:,.0f}); SD/plain {s['peak_mib'] / p['peak_mib']:.2f} peak, "
              f"{(s['peak_mib'] - s['before_mib']) / max(p['peak_mib'] - p['before_mib'], 1e-9):.2f} step increment")


if __name__ == "__main__":
    main()
