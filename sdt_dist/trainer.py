"""The training loop: data, steps, logging, validation, checkpoints, resume, signals.

The loop never touches model internals: `train_step` runs the algorithm on an `SDTrainModule`;
this file decides when to log, evaluate, save and stop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sdt_dist import checkpoint
from sdt_dist.checkpoint.layout import layout_changed, saved_layout
from sdt_dist.checkpoint.resume import check_config, choose_on_all_ranks
from sdt_dist.config import Config, adopt_legacy_values
from sdt_dist.data.errors import DataError
from sdt_dist.data.loader import MicroBatchIterator, build_datasets
from sdt_dist.data.manifest import verify_prepared
from sdt_dist.data.prepare import prepare_configured
from sdt_dist.data.tokenizer import check_vocab, load_tokenizer
from sdt_dist.eval.compute import layer_params, step_flops
from sdt_dist.faults import maybe_die
from sdt_dist.metrics import MetricsLogger
from sdt_dist.mfu import mfu, peak_flops
from sdt_dist.parallel.dims import ParallelDims, device
from sdt_dist.plan.measure import PlanCheck
from sdt_dist.progress import StepClock
from sdt_dist.run_lock import lock_run_dir
from sdt_dist.train_module import SDTrainModule
from sdt_dist.train_step import StepResult, train_step


def log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[sdt-dist] {msg}", flush=True)


def _on_rank0_then_all(dims: ParallelDims, fn) -> None:
    """Run `fn` on rank 0; every rank raises the DataError it raised (no rank is left in a barrier)."""
    error = [None]
    if dims.is_main:
        try:
            fn()
        except DataError as e:
            error[0] = str(e)
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise DataError(error[0])


def prepare_data(cfg: Config, dims: ParallelDims) -> list[str]:
    """Rank 0 prepares `data.source` into the prepared dir once (the built-in path), or checks every
    prepared file's size and sha256 against its manifest; a bad file stops every rank before training."""
    d = cfg.data
    if d.source is not None:
        _on_rank0_then_all(dims, lambda: prepare_configured(cfg))
    else:
        _on_rank0_then_all(dims, lambda: [verify_prepared(p, quick=not d.verify_checksums) for p in d.prepared])
    for prepared in d.prepared:
        check_vocab(prepared, cfg.model.vocab_size)
    return d.prepared


class _StopFlag:
    """SIGTERM/SIGUSR1 (preemption, Slurm's warning before the time limit) and a first Ctrl-C (SIGINT):
    finish the current step, checkpoint, then exit 0. A second Ctrl-C exits at once, saving nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            os.write(2, b"[sdt-dist] second Ctrl-C: exiting without a checkpoint\n")
            os._exit(128 + signal.SIGINT)
        if signum == signal.SIGINT:
            os.write(2, b"[sdt-dist] Ctrl-C: finishing this step and saving (Ctrl-C again to quit at once)\n")
        self.signum = signum


def adopt_checkpoint_legacy_values(cfg: Config, path: Path | None) -> None:
    """A checkpoint from before a config key existed resumes with the behaviour it was trained with."""
    if path is None:
        return
    adopted = adopt_legacy_values(cfg, json.loads((path / "meta.json").read_text())["config"])
    if adopted:
        log0(f"checkpoint {path} predates {', '.join(a.split('=')[0] for a in adopted)}: resuming with "
             f"{', '.join(adopted)}, as it was trained")


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        self.cfg, self.dims = cfg, dims
        self.run_dir = Path(cfg.train.out_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.run_lock = lock_run_dir(self.run_dir, dims.is_main)  # before anything is written
        prepared = prepare_data(cfg, dims)
        t = cfg.train
        self.gas = t.global_batch_size // (t.micro_batch_size * dims.dp)
        self.train_ds, self.valid_ds = build_datasets(
            prepared, cfg.data.weights, seq_length=cfg.model.seq_length, seed=t.seed,
            num_train_samples=t.max_steps * t.global_batch_size,
            num_valid_samples=max(t.eval_samples, t.micro_batch_size * dims.dp))
        self.tokenizer_sha = load_tokenizer(prepared[0]).sha256
        # the checkpoint to resume is chosen (and verified) once, before the model: its config may predate keys
        self.resume_from = choose_on_all_ranks(cfg.train.resume, self.ckpt_root, dims.is_main, log0)
        adopt_checkpoint_legacy_values(cfg, self.resume_from)
        self.plan_check = PlanCheck(cfg, dims, log0)  # logs the memory plan; checked after the first step
        self.tm = SDTrainModule(cfg, dims)
        teacher = self.tm.teacher
        log0(f"EMA teacher storage per rank: {teacher.local_numel():,} fp32 values "
             f"({teacher.local_numel() * 4 / 2**20:.1f} MiB) = 1/{dims.dp} of this stage's/TP shard's "
             f"{teacher.full_numel():,}")
        log0(f"EMA teacher forward gathers at most {self.tm.teacher_gather(self.gas)}")
        self.metrics = MetricsLogger(self.run_dir, dims.is_main, cfg.logging.tensorboard,
                                     cfg.logging.wandb_project if cfg.logging.wandb else None, cfg.to_dict())
        self.peak_flops, source = peak_flops(self.tm.dtype, device(), cfg.logging.peak_flops)
        log0(f"MFU against {self.peak_flops / 1e12:.3g} TFLOP/s per device ({source})")
        self.step = 0
        self.consumed = 0
        self.skipped_in_row = 0
        self.skipped_total = 0

    def _meta(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "config_sha256": self.cfg.sha256(),
                "tokenizer_sha256": self.tokenizer_sha, "world_size": self.dims.world_size,
                "layout": self.dims.describe(), "step": self.step, "consumed_samples": self.consumed}

    def resume(self) -> None:
        path = self.resume_from
        if path is None:
            return
        meta = json.loads((path / "meta.json").read_text())
        if meta["tokenizer_sha256"] != self.tokenizer_sha:
            raise RuntimeError(f"checkpoint {path} was trained with another tokenizer "
                               f"({meta['tokenizer_sha256'][:12]} vs {self.tokenizer_sha[:12]})")
        relayout = layout_changed(path, self.dims)
        check_config(path, meta["config"], self.cfg.to_dict(), relayout)
        extra = checkpoint.load(self.tm, path)
        self.step, self.consumed = extra["step"], extra["consumed_samples"]
        log0(f"resumed from {path} at step {self.step} ({self.consumed} samples consumed, "
             f"{self.tm.frozen} layers frozen)" + (f", written at {saved_layout(path)}" if relayout else ""))

    def save(self) -> None:
        path = checkpoint.save(self.tm, self.ckpt_root, self.step, self.consumed, self._meta(),
                               self.cfg.train.keep_checkpoints)
        log0(f"saved checkpoint {path}")

    def _reduce_mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.dims.dp_group)
        return (t / self.dims.dp).tolist()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation perplexity: token-level, over non-overlapping windows of the held-out split."""
        engine = self.tm.engine
        engine.eval()
        dev = device()
        nll = torch.zeros(2, dtype=torch.float64)
        it = MicroBatchIterator(self.valid_ds, micro_batch_size=self.cfg.train.micro_batch_size,
                                dp_rank=self.dims.dp_rank, dp_size=self.dims.dp)
        for _ in range(max(1, self.cfg.train.eval_samples // (self.cfg.train.micro_batch_size * self.dims.dp))):
            batch = {k: v.to(dev) for k, v in next(it).items()}
            loss = self.tm.eval_loss(batch)
            n = batch["loss_mask"].sum().item()
            nll += torch.tensor([loss * n, n], dtype=torch.float64)
        dist.all_reduce(nll, group=self.dims.dp_group)
        engine.train()
        val_loss = (nll[0] / nll[1]).item()
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _record(self, res: StepResult, dt: float) -> dict[str, Any]:
        loss, lm, kd, align = self._reduce_mean([res.loss, res.loss_lm, res.loss_kd, res.loss_align])
        tokens = self._reduce_mean([float(res.tokens)])[0] * self.dims.dp
        flops = step_flops(self.cfg, layer_params(self.cfg.model), self.dims.dp, self.step - 1, res.frozen_layers,
                           res.shared_trunk)
        return {"step": self.step, "loss": loss, "loss_lm": lm, "loss_kd": kd, "loss_align": align,
                "lr": res.lr, "tau": res.tau, "frozen_layers": res.frozen_layers,
                "dropped_layers": res.dropped_layers, "aligned_layers": res.aligned_layers,
                "skipped": res.skipped, "skipped_total": self.skipped_total,
                "tokens_per_s": tokens / max(dt, 1e-9), "step_time_s": dt,
                "mfu": mfu(flops, dt, self.dims.world_size, self.peak_flops), "consumed_samples": self.consumed}

    def _should_stop(self, stop: _StopFlag) -> int:
        # Every rank must agree, or the ranks that stop would hang the others in the next collective; the
        # signal number travels with the flag, so rank 0 can name a signal only another rank received.
        flag = torch.tensor([float(stop.signum or 0)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def fit(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        stop = _StopFlag()
        self.resume()
        it = MicroBatchIterator(self.train_ds, micro_batch_size=t.micro_batch_size, dp_rank=self.dims.dp_rank,
                                dp_size=self.dims.dp, consumed_samples=self.consumed)
        dev = device()
        log0(f"training steps {self.step}..{t.max_steps} | {self.dims.describe()} | micro {t.micro_batch_size} "
             f"x grad-accum {self.gas} x DP {self.dims.dp} = global {t.global_batch_size}")
        clock = StepClock(t.max_steps)
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            batches = [{k: v.to(dev) for k, v in next(it).items()} for _ in range(self.gas)]
            res = train_step(self.tm, batches, self.step)
            self.plan_check.after_step(self.tm)
            self.step += 1
            self.consumed = it.consumed_samples
            maybe_die("step", self.step)
            if res.skipped:
                self.skipped_in_row += 1
                self.skipped_total += 1
                log0(f"step {self.step}: non-finite loss, step skipped ({self.skipped_in_row} in a row)")
                if self.skipped_in_row >= t.max_skipped_steps:
                    raise RuntimeError(f"{self.skipped_in_row} consecutive non-finite steps; stopping. The last "
                                       f"good checkpoint is in {self.ckpt_root}")
            else:
                self.skipped_in_row = 0
            dt = time.perf_counter() - t0
            clock.tick(dt)
            if self.step % cfg.logging.log_interval == 0 or self.step == t.max_steps or res.skipped:
                record = self._record(res, dt)
                if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                    record.update(self.evaluate())
                self.metrics.log(record)
                log0(" | ".join([f"step {self.step}/{t.max_steps}"] + [
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k in (
                        "loss", "loss_lm", "loss_kd", "loss_align", "lr", "frozen_layers", "tokens_per_s", "mfu",
                        "val_ppl")] + [clock.describe(self.step)]))
            if self.step % t.save_interval == 0 or self.step == t.max_steps:
                self.save()
            if signum := self._should_stop(stop):
                log0(f"received signal {signum} (on some rank): saving and exiting")
                if self.step % t.save_interval != 0 and self.step != t.max_steps:
                    self.save()
                self.metrics.close()
                sys.exit(0)
        self.metrics.close()
