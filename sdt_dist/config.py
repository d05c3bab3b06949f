"""One typed config tree for a run, read from YAML with dotted command-line overrides.

Every section is a dataclass whose fields carry their defaults and meaning. `load_config` parses YAML
safely (no object tags), applies `--set a.b=c` overrides, and `validate` rejects every invalid value or
combination with a `ConfigError` naming the key, before any worker process starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from sdt_dist.paths import expand_vars

OPTIMIZER_IMPLS = ("fused", "foreach", "for-loop")  # train.optimizer_impl: torch AdamW's kernels


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the key."""


@dataclass
class ModelConfig:
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None -> 4 * hidden_size
    vocab_size: int = 50304  # model vocabulary; must be >= the tokenizer's
    seq_length: int = 1024
    dropout: float = 0.1  # hidden and attention dropout of the student (the teacher runs without)
    tie_embeddings: bool = True  # share the embedding matrix with the output head
    rope_base: float = 10000.0
    init_std: float = 0.02
    recompute: str = "none"  # activation checkpointing: none | selective (attention core) | full (each layer)


@dataclass
class ParallelConfig:
    tensor: int = 1  # tensor-parallel size (megatron-core)
    pipeline: int = 1  # pipeline-parallel size (DeepSpeed pipeline engine)
    zero_stage: int = 1  # 0-3; with pipeline > 1 only 1
    ds_config: str | None = None  # DeepSpeed JSON (precision, ZeRO details); batch keys are derived here
    sequence_parallel: bool = False  # Megatron SP: activations split along the sequence over the TP group


@dataclass
class DistillConfig:
    """SelfDistil-T components; each can be switched off for the paper's ablations."""

    ema: bool = True  # False (ablation): tau = 0, the teacher is the current student under stop-grad
    ema_tau: float = 0.99  # constant tau, used when tau_end is None
    ema_tau_end: float | None = None  # anneal tau from ema_tau to this value (data2vec-style)
    ema_anneal_frac: float = 1.0  # fraction of max_steps over which tau is annealed
    lambda_kd: float = 1.0
    temperature: float = 2.0
    lambda_sd: float = 0.3  # weight of the predictive-alignment term (chosen in docs/results/recipe.md)
    align_reduce: str = "mean"  # sum | mean over the aligned layers of the step (mean: scale independent of depth)
    align_map: str = "identity"  # f(l): identity | strided | nearest
    teacher_layers: int | None = None  # teacher depth for f(l); None -> same as the student
    kappa_start_layers: int = 1  # aligned layers at t=0 (top-most first)
    kappa_ramp_frac: float = 0.5  # fraction of max_steps over which kappa reaches all unfrozen layers
    # Progressive freezing and LayerDrop are off by default: at the measured scale each costs held-out
    # perplexity (docs/results/tables_v3.md); freezing saves compute, LayerDrop makes layer pruning cheaper
    # (Tables 4 and 5). The paper's schedule: milestones and fractions [0.1, 0.2, 0.3], layerdrop_p 0.1.
    freeze_milestones: list[float] = field(default_factory=list)  # fractions of steps
    freeze_fractions: list[float] = field(default_factory=list)  # cumulative alpha_m
    freeze_embedding: bool = False  # also freeze the embedding with the first layers (False: layers only, the paper)
    # The teacher takes the frozen prefix's output states from the student instead of recomputing them (bitwise the
    # same: frozen weights are copied into the teacher, and without dropout both compute alike). Needs
    # freeze_embedding: with the embedding training, the teacher's is an EMA that differs from the student's and
    # nothing can be shared. Not under pipeline parallelism. None: on when model.dropout == 0.
    share_frozen_trunk: bool | None = None
    # How the teacher's sharded weights are gathered over DP > 1 for its forward: "module" (one module at a time,
    # for every micro-batch: the least memory) or "step" (the whole model once per optimizer step and kept for
    # all its micro-batches: 1/accumulation-steps of the all-gather traffic, the whole teacher in the compute
    # dtype held during the step). The same numbers either way.
    teacher_gather: str = "module"
    layerdrop_p: float = 0.0
    layerdrop_schedule: str = "uniform"  # uniform | linear (p_l = p * l / L)


@dataclass
class DataConfig:
    source: str | None = None  # raw corpus (files or a hub dataset name) to prepare into `prepared`
    prepared: list[str] = field(default_factory=list)  # prepared shard dirs (manifest.json inside)
    weights: list[float] | None = None  # blending weights, one per prepared dir
    tokenizer: str | None = None  # sentencepiece model; None -> trained into the prepared dir
    tokenizer_vocab_size: int = 50000  # vocab of a tokenizer trained by the built-in path
    text_field: str = "text"
    valid_fraction: float = 0.05
    workers: int = 2  # preparation processes
    verify_checksums: bool = True  # sha256 of every shard against the manifest at start (sizes always)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    seed: int = 1234
    micro_batch_size: int = 8
    global_batch_size: int = 8  # micro * data-parallel * gradient accumulation
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    # torch AdamW's kernel: "fused" (one pass over each tensor; on CPU 4x faster than the others, no step
    # temporaries), "foreach" (torch's default on CUDA) or "for-loop" (its default on CPU); equal up to rounding
    optimizer_impl: str = "fused"
    save_interval: int = 500
    keep_checkpoints: int = 3
    # also write full_optimizer.safetensors (whole fp32 masters + Adam moments), so that the checkpoint can
    # resume at another TP x PP x DP x ZeRO layout (sdt_dist/checkpoint/relayout.py); false: same-layout resume only
    save_full_optimizer: bool = True
    resume: str = "auto"  # auto | none | path of a checkpoint dir
    # weights only (continued pretraining): an export, checkpoint, run dir or `sdt-export-hf` folder; a run with
    # checkpoints of its own resumes from them instead
    init_from: str | None = None
    eval_interval: int = 100
    eval_samples: int = 64
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    wandb: bool = False  # also log to Weights & Biases (pip install 'sdt-dist[wandb]'; WANDB_MODE=offline works)
    wandb_project: str = "sdt-dist"
    peak_flops: float | None = None  # peak FLOP/s of one device for `mfu`; None: known bf16 figure, or measured


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sha256(self) -> str:
        """Identity of the run's configuration, as checkpoints record it (meta.json `config_sha256`)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# Keys added after checkpoints already existed, with the behaviour those checkpoints were trained with: a
# recorded config that lacks one of them means the old value, not today's default.
LEGACY_VALUES: dict[str, dict[str, Any]] = {"distill": {"align_reduce": "sum", "freeze_embedding": True}}


def with_legacy_values(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded config dict (meta.json `config`) completed with the legacy value of every key it predates."""
    out = {section: dict(values) for section, values in recorded.items()}
    for section, values in LEGACY_VALUES.items():
        for key, value in values.items():
            out.setdefault(section, {}).setdefault(key, value)
    return out


def adopt_legacy_values(cfg: Config, recorded: dict[str, Any]) -> list[str]:
    """Resuming a checkpoint whose recorded config predates a key: keep the checkpoint's behaviour for it.
    Returns `section.key=value` for each key adopted."""
    adopted = []
    for section, values in LEGACY_VALUES.items():
        for key, value in values.items():
            if key not in recorded.get(section, {}):
                setattr(getattr(cfg, section), key, value)
                adopted.append(f"{section}.{key}={value}")
    return adopted


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/override value to the field's declared type, or fail naming the key."""
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def config_from_dict(recorded: dict[str, Any]) -> Config:
    """A recorded config dict (meta.json `config`, a sweep record) as a Config: keys it predates take their
    legacy value (LEGACY_VALUES) or today's default; not validated (its data paths may be gone)."""
    return _build(Config, with_legacy_values(recorded), "")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (valid: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` overrides to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return raw


def _expand(text: str) -> str:
    # Let configs name shared corpora portably, e.g. ${SDT_SHARED_DATA}/wikitext-2/...
    return expand_vars(text)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        try:
            raw = yaml.safe_load(_expand(text)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    raw = apply_overrides(raw, [_expand(o) for o in (overrides or [])])
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config, world_size: int | None = None) -> None:
    m, p, d, t = cfg.model, cfg.parallel, cfg.distill, cfg.train
    for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        _check(getattr(m, key) > 0, f"model.{key}", "must be > 0")
    _check(m.hidden_size % m.num_attention_heads == 0, "model.num_attention_heads",
           f"hidden_size {m.hidden_size} is not divisible by num_attention_heads {m.num_attention_heads}")
    _check((m.hidden_size // m.num_attention_heads) % 2 == 0, "model.num_attention_heads",
           "head dimension must be even for rotary embeddings")
    _check(m.ffn_hidden_size is None or m.ffn_hidden_size > 0, "model.ffn_hidden_size", "must be > 0")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(m.init_std > 0, "model.init_std", "must be > 0")
    _check(m.recompute in ("none", "selective", "full"), "model.recompute",
           f"must be none, selective or full, got {m.recompute!r}")

    _check(p.tensor >= 1, "parallel.tensor", "must be >= 1")
    _check(p.pipeline >= 1, "parallel.pipeline", "must be >= 1")
    _check(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _check(m.num_attention_heads % p.tensor == 0, "parallel.tensor",
           f"num_attention_heads {m.num_attention_heads} is not divisible by tensor-parallel size {p.tensor}")
    _check(m.vocab_size % p.tensor == 0, "parallel.tensor",
           f"model.vocab_size {m.vocab_size} is not divisible by tensor-parallel size {p.tensor}")
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    _check(ffn % p.tensor == 0, "parallel.tensor", f"ffn_hidden_size {ffn} not divisible by {p.tensor}")
    _check(m.num_layers % p.pipeline == 0, "parallel.pipeline",
           f"num_layers {m.num_layers} is not divisible by pipeline size {p.pipeline}")
    # ZeRO-2/3 are refused by DeepSpeed's pipeline engine; ZeRO-0 with PP mis-clips (later stages'
    # replicated params drop out of the grad norm): ZeRO-1 is the one exact choice.
    _check(p.pipeline == 1 or p.zero_stage == 1, "parallel.zero_stage",
           f"with parallel.pipeline={p.pipeline} use ZeRO stage 1 (DeepSpeed's pipeline engine refuses 2/3, "
           f"and stage 0 clips gradients wrongly)")
    _check(p.pipeline == 1 or not m.tie_embeddings, "model.tie_embeddings",
           f"with parallel.pipeline={p.pipeline} set it to false (the embedding and the head live on different "
           f"stages)")
    # Megatron SP splits the sequence across the TP group
    _check(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel",
           "needs tensor parallelism (parallel.tensor > 1): it splits the sequence across the TP group")
    _check(not p.sequence_parallel or m.seq_length % p.tensor == 0, "parallel.sequence_parallel",
           f"model.seq_length {m.seq_length} is not divisible by tensor-parallel size {p.tensor}")
    if p.ds_config is not None:
        _check(Path(p.ds_config).is_file(), "parallel.ds_config", f"file not found: {p.ds_config}")

    _check(0.0 < d.ema_tau < 1.0, "distill.ema_tau", f"must be in (0, 1), got {d.ema_tau}")
    _check(d.ema_tau_end is None or 0.0 < d.ema_tau_end < 1.0, "distill.ema_tau_end",
           f"must be in (0, 1), got {d.ema_tau_end}")
    _check(0.0 < d.ema_anneal_frac <= 1.0, "distill.ema_anneal_frac", "must be in (0, 1]")
    _check(d.lambda_kd >= 0, "distill.lambda_kd", "must be >= 0")
    _check(d.lambda_sd >= 0, "distill.lambda_sd", "must be >= 0")
    _check(d.temperature > 0, "distill.temperature", f"must be > 0, got {d.temperature}")
    _check(d.align_reduce in ("sum", "mean"), "distill.align_reduce",
           f"must be sum or mean, got {d.align_reduce!r}")
    _check(d.align_map in ("identity", "strided", "nearest"), "distill.align_map",
           f"must be identity, strided or nearest, got {d.align_map!r}")
    _check(d.teacher_layers is None or d.teacher_layers == m.num_layers, "distill.teacher_layers",
           "the EMA teacher has the student's depth")
    _check(1 <= d.kappa_start_layers <= m.num_layers, "distill.kappa_start_layers",
           f"must be in [1, {m.num_layers}]")
    _check(0.0 <= d.kappa_ramp_frac <= 1.0, "distill.kappa_ramp_frac", "must be in [0, 1]")
    _check(len(d.freeze_milestones) == len(d.freeze_fractions), "distill.freeze_fractions",
           "needs one fraction per entry of distill.freeze_milestones")
    for name, values in (("freeze_milestones", d.freeze_milestones), ("freeze_fractions", d.freeze_fractions)):
        _check(all(0.0 < v < 1.0 for v in values), f"distill.{name}", f"values must be in (0, 1), got {values}")
        _check(all(a < b for a, b in zip(values, values[1:])), f"distill.{name}",
               f"must be strictly increasing, got {values}")
    _check(0.0 <= d.layerdrop_p < 1.0, "distill.layerdrop_p", f"must be in [0, 1), got {d.layerdrop_p}")
    _check(d.layerdrop_schedule in ("uniform", "linear"), "distill.layerdrop_schedule",
           "must be uniform or linear")
    _check(d.teacher_gather in ("module", "step"), "distill.teacher_gather",
           f"must be module or step, got {d.teacher_gather!r}")
    if d.share_frozen_trunk:  # asked for explicitly: refuse where it would be wrong, or share nothing
        _check(m.dropout == 0, "distill.share_frozen_trunk",
               f"needs model.dropout=0 (the student's prefix runs with dropout {m.dropout}, the teacher's without)")
        _check(d.freeze_embedding, "distill.share_frozen_trunk",
               "needs distill.freeze_embedding=true (the teacher's embedding is otherwise an EMA: nothing to share)")
        _check(p.pipeline == 1, "distill.share_frozen_trunk", "not supported with parallel.pipeline > 1")

    _check(t.max_steps > 0, "train.max_steps", "must be > 0")
    _check(t.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
    _check(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not a multiple of micro_batch_size {t.micro_batch_size}")
    _check(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.min_lr", "need 0 <= min_lr <= lr and lr > 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two values in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    _check(t.optimizer_impl in OPTIMIZER_IMPLS, "train.optimizer_impl", f"one of {', '.join(OPTIMIZER_IMPLS)}")
    _check(t.save_interval > 0, "train.save_interval", "must be > 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.eval_interval > 0, "train.eval_interval", "must be > 0")
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")
    _check(cfg.logging.log_interval > 0, "logging.log_interval", "must be > 0")
    _check(not cfg.logging.wandb or importlib.util.find_spec("wandb") is not None, "logging.wandb",
           "the wandb package is not installed: pip install 'sdt-dist[wandb]' (or set logging.wandb=false)")
    _check(cfg.logging.peak_flops is None or cfg.logging.peak_flops > 0, "logging.peak_flops", "must be > 0")

    data = cfg.data
    _check(bool(data.prepared) or data.source is not None, "data.prepared",
           "name prepared shard dirs, or data.source to prepare them from")
    _check(data.source is None or len(data.prepared) == 1, "data.prepared",
           "with data.source, name exactly one prepared dir to build into")
    _check(data.weights is None or len(data.weights) == len(data.prepared), "data.weights",
           "needs one weight per prepared dir")
    _check(data.weights is None or all(w > 0 for w in data.weights), "data.weights", "must be > 0")
    _check(0.0 < data.valid_fraction < 1.0, "data.valid_fraction", "must be in (0, 1)")
    _check(data.workers >= 1, "data.workers", "must be >= 1")

    if world_size is not None:
        check_layout(cfg, world_size)


def check_layout(cfg: Config, world_size: int) -> int:
    """Validate the parallel layout for a world size; returns the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    mp = p.tensor * p.pipeline
    _check(world_size % mp == 0, "parallel.tensor",
           f"world size {world_size} is not divisible by tensor x pipeline = {p.tensor} x {p.pipeline}")
    dp = world_size // mp
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel = "
           f"{t.micro_batch_size} x {dp}")
    return dp
