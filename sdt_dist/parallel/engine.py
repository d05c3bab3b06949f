"""DeepSpeed engine construction: the DeepSpeed config derived from the run config, ZeRO-3 model init,
and `deepspeed.initialize` with megatron-core's process groups.

The optimizer is ours (torch AdamW with decay / no-decay groups) so that freezing can rebuild it over
the kept parameters; the learning rate is set each step from the pure schedule in `schedules.py`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from pathlib import Path
from typing import Any

import torch

from sdt_dist.config import Config, ConfigError
from sdt_dist.parallel.dims import ParallelDims
from sdt_dist.parallel.mpu import MegatronMpu

_OWNED_KEYS = ("optimizer", "scheduler")


def build_ds_config(cfg: Config, dp: int) -> dict[str, Any]:
    """The DeepSpeed config: the JSON's precision/ZeRO details plus batch, clipping and stage from `cfg`."""
    base: dict[str, Any] = {}
    if cfg.parallel.ds_config:
        try:
            base = json.loads(Path(cfg.parallel.ds_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"parallel.ds_config: cannot read {cfg.parallel.ds_config}: {e}") from None
    for key in _OWNED_KEYS:
        if key in base:
            raise ConfigError(f"parallel.ds_config: remove '{key}' from {cfg.parallel.ds_config}; "
                              f"sdt-dist sets it from the train section")
    t = cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    derived = {"train_micro_batch_size_per_gpu": t.micro_batch_size, "gradient_accumulation_steps": gas,
               "train_batch_size": t.global_batch_size}
    for key, value in derived.items():
        if base.get(key, "auto") not in ("auto", value):
            raise ConfigError(f"parallel.ds_config: {key}={base[key]} disagrees with the train section "
                              f"({value}); use \"auto\" or remove it")
        base[key] = value
    zero = base.setdefault("zero_optimization", {})
    # the stage is parallel.zero_stage's alone; a JSON may say "auto" (or nothing), or agree with it
    if zero.get("stage", "auto") not in ("auto", cfg.parallel.zero_stage):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage} disagrees with "
                          f"{cfg.parallel.ds_config} (stage {zero['stage']})")
    zero["stage"] = cfg.parallel.zero_stage
    base["gradient_clipping"] = t.grad_clip
    if cfg.parallel.pipeline > 1:
        # Stages exchange several tensors (student state, teacher bits, alignment sum); DeepSpeed can split
        # only a tuple's first tensor over the TP ranks, and only when nothing else in it needs a gradient.
        base.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    base.setdefault("zero_allow_untested_optimizer", True)
    base.setdefault("steps_per_print", 10**9)
    base.setdefault("wall_clock_breakdown", False)
    return base


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def model_init_context(ds_config: dict[str, Any], dims: ParallelDims) -> contextlib.AbstractContextManager:
    """ZeRO-3 partitions parameters at construction, over megatron's data-parallel group: without the
    group, zero.Init partitions over the whole world and silently mixes tensor-parallel shards."""
    if ds_config["zero_optimization"]["stage"] != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=dims.dp_group,
                               mpu=MegatronMpu())


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases, norms and 1-D parameters."""
    # a ZeRO-3 parameter's own tensor is a 1-D partition (or a gathered copy): its shape is `ds_shape`
    ndim = {id(p): len(getattr(p, "ds_shape", p.shape)) for _, p in named_params}
    decay = [p for n, p in named_params if p.requires_grad and ndim[id(p)] >= 2]
    no_decay = [p for n, p in named_params if p.requires_grad and ndim[id(p)] < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


_ADAMW_KERNEL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], impl: str) -> torch.optim.AdamW:
    """torch AdamW over `groups` with the kernel `impl` names (`train.optimizer_impl`)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, **_ADAMW_KERNEL[impl])
    except RuntimeError as e:  # e.g. no fused kernel for this device type
        raise RuntimeError(f"train.optimizer_impl={impl}: {e} (train.optimizer_impl=foreach runs anywhere)") from e


def initialize_engine(module: torch.nn.Module, groups: list[dict], ds_config: dict[str, Any], lr: float,
                      betas: tuple[float, float], dims: ParallelDims, optimizer_impl: str):
    import deepspeed

    optimizer = adamw(groups, lr, betas, optimizer_impl)
    # The pipeline engine takes its groups from the PipelineModule's topology and refuses an mpu.
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, config=copy.deepcopy(ds_config),
        mpu=MegatronMpu() if dims.pp == 1 else None, dist_init_required=False,
    )
    if dims.dp == 1 and dims.pp == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # One data-parallel rank: DeepSpeed's gradient all-reduce would flatten every gradient into a bucket,
        # all-reduce it over a group of one and copy it back (x 1/1), two copies of all gradients per step for
        # an identity. Keep only what it does besides (sequence-parallel gradients are summed by our own hooks).
        engine.allreduce_gradients = functools.partial(_zero_missing_grads, engine)
    return engine


def module_parameters(engine) -> list[torch.nn.Parameter]:
    """`engine.module`'s parameters, listed once per engine: walking the module tree for them costs about as much
    as a small layer's kernels, and the per-step checks need them every step. (Freezing changes flags, not the
    parameters; it builds a new engine anyway.)"""
    # its own __dict__: DeepSpeedEngine.__getattr__ would fall through to the module's attributes
    params = engine.__dict__.get("_sdt_parameters")
    if params is None:
        params = engine.__dict__["_sdt_parameters"] = list(engine.module.parameters())
    return params


def _zero_missing_grads(engine, bucket_size: int | None = None) -> None:
    """At the accumulation boundary a trainable parameter without a gradient (a predictor not aligned this
    step, a LayerDropped layer) gets a zero one, as DeepSpeed's all-reduce gives it: AdamW then steps it
    (momentum, weight decay) exactly as with several data-parallel ranks."""
    if not engine.is_gradient_accumulation_boundary():
        return
    for p in module_parameters(engine):
        if p.requires_grad and p.grad is None and p.numel():
            p.grad = torch.zeros_like(p)
