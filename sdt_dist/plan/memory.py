"""Per-rank memory of a SelfDistil-T run under a layout, term by term, from the parameter inventory.

Exact terms (they equal the bytes the engine allocates: `tests/plan/test_plan.py`) follow DeepSpeed 0.19's
allocation rules:
  * parameters (compute dtype): ZeRO-0 whole; ZeRO-1/2 one flat buffer per AdamW group (decay, no-decay),
    padded to a multiple of 2 x DP elements; ZeRO-3 a 1/DP partition of every parameter (ceil), plus a whole
    copy of the "persistent" ones (<= stage3_param_persistence_threshold elements, DeepSpeed default 1e5);
  * fp32 master weights: none for ZeRO-0 in fp32 (the parameters are the masters), a whole fp32 copy for
    ZeRO-0 in 16 bits, the rank's 1/DP partition for ZeRO-1/2/3 (a copy even in fp32);
  * Adam moments (exp_avg, exp_avg_sq): two fp32 values per master element, allocated at the first step;
  * EMA teacher shard: fp32, ceil(numel / DP) of every GPT parameter of this stage's TP shard
    (`sdt_dist/distill/teacher.py`); predictors have no teacher.
Estimates (labelled so in the output): gradients and their reduce buckets, the teacher's and ZeRO-3's
gathered weights, activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models": 34 s b h + 5 a s^2 b bytes per layer at 16 bits, split by TP / SP as there), logits and
loss buffers, and the init peak.
The steady-state peak is the end of a forward, when activations peak, or the optimizer step, when gradients and
AdamW's temporaries do (a backward frees activations as it makes gradients): the larger of the two, where the
forward also holds the gradient buffers that outlive a step (ZeRO-2/3's reduce bucket, ZeRO-3's flat gradient
partition) or a micro-batch (gradient accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sdt_dist.config import Config, check_layout
from sdt_dist.distill.fused_lm_kd import chunk_elements
from sdt_dist.distill.teacher import gathered_per_step
from sdt_dist.parallel.engine import build_ds_config, compute_dtype
from sdt_dist.plan.inventory import ParamInfo

GiB = 2**30
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    zero: int
    micro_batch: int
    recompute: str = "none"
    sequence_parallel: bool = False

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def describe(self) -> str:
        sp = " SP" if self.sequence_parallel else ""
        return (f"TP={self.tp}{sp} PP={self.pp} DP={self.dp} ZeRO-{self.zero} micro_batch={self.micro_batch} "
                f"recompute={self.recompute}")


@dataclass(frozen=True)
class Precision:
    param_bytes: int  # compute dtype: 4 (fp32) or 2 (bf16/fp16)
    persistence_threshold: int = 100_000  # ZeRO-3 stage3_param_persistence_threshold
    reduce_bucket: int = 500_000_000  # elements (DeepSpeed default)
    flash_attention: bool = True  # SDPA keeps no s x s scores (a fused kernel); the math path does
    loss_chunk: int = chunk_elements("cuda")  # elements of a fused LM + KD chunk temporary on the device


def run_layout(cfg: Config, world: int) -> Layout:
    """The layout the trainer would run `cfg` with on `world` ranks (ConfigError if it cannot)."""
    check_layout(cfg, world)
    p = cfg.parallel
    return Layout(world=world, tp=p.tensor, pp=p.pipeline, zero=p.zero_stage, micro_batch=cfg.train.micro_batch_size,
                  recompute=cfg.model.recompute, sequence_parallel=p.sequence_parallel)


def run_precision(cfg: Config, dp: int, device: str | None = "cuda") -> Precision:
    """Compute dtype and ZeRO buffer sizes from the DeepSpeed config the trainer derives, on a device of this
    type (None: not known, planned without a fused attention kernel). A CUDA device has a fused SDPA kernel
    with dropout; without dropout torch's CPU kernel is fused too."""
    flash_attention = device not in (None, "cpu")
    ds = build_ds_config(cfg, dp)
    zero = ds["zero_optimization"]
    return Precision(param_bytes=compute_dtype(ds).itemsize,
                     persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
                     reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)),
                     flash_attention=flash_attention or cfg.model.dropout == 0,
                     loss_chunk=chunk_elements("cuda" if device is None else device))


@dataclass
class StagePlan:
    """Bytes per rank of one pipeline stage (all its DP x TP ranks alike, up to padding)."""

    stage: int
    params_numel: int  # this rank's TP shard of the stage, before ZeRO
    exact: dict[str, int] = field(default_factory=dict)  # parameters, master_weights, optimizer_state, teacher_shard
    estimated: dict[str, int] = field(default_factory=dict)  # gradients, gathers, activations, ...
    activation_per_micro: dict[str, int] = field(default_factory=dict)  # recompute mode -> bytes
    inflight: int = 1  # micro-batches whose activations are alive at once (1F1B pipeline)
    forward_gradients: int = 0  # gradient bytes alive during a forward (kept buffers, accumulated gradients)
    init_peak: int = 0
    teacher_all_gather: int = 0  # bytes the teacher's forwards all-gather in a step (DP > 1), own slices included

    @property
    def steady_peak(self) -> int:
        est = dict(self.estimated)
        step = est.pop("gradients", 0) + est.pop("optimizer_step", 0)
        forward = est.pop("activations", 0) + self.forward_gradients
        return sum(self.exact.values()) + sum(est.values()) + max(forward, step)


def stage_params(inv: list[ParamInfo], layers: int, pp: int, stage: int) -> list[ParamInfo]:
    """What a pipeline stage holds (`parallel/pipeline.py`: embedding first, head last, predictors with
    their layers)."""
    per = layers // pp
    lo, hi = stage * per + 1, (stage + 1) * per

    def here(p: ParamInfo) -> bool:
        if p.unit in ("layer", "predictor"):
            return lo <= p.layer <= hi
        return stage == (0 if p.unit == "embedding" else pp - 1)

    return [p for p in inv if here(p)]


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def model_state_bytes(params: list[ParamInfo], lay: Layout, prec: Precision,
                      trainable: list[ParamInfo] | None = None) -> dict[str, int]:
    """Exact per-rank bytes of parameters, fp32 masters, Adam moments (over `trainable`, default all)."""
    tp, dp, b = lay.tp, lay.dp, prec.param_bytes
    trainable = params if trainable is None else trainable
    if lay.zero == 0:
        master = 0 if b == 4 else sum(p.local(tp) for p in trainable)
        moments = sum(p.local(tp) for p in trainable)
        resident = sum(p.local(tp) for p in params)
    elif lay.zero in (1, 2):
        groups = [sum(p.local(tp) for p in trainable if p.matrix), sum(p.local(tp) for p in trainable if not p.matrix)]
        flat = [_align(n, 2 * dp) for n in groups if n]
        master = moments = sum(f // dp for f in flat)
        resident = sum(flat) + sum(p.local(tp) for p in params if p not in trainable)
    else:
        parts = [math.ceil(p.local(tp) / dp) for p in trainable]
        master = moments = sum(parts)
        resident = sum(math.ceil(p.local(tp) / dp) for p in params)
        if dp > 1:  # at DP = 1 the gathered parameter is its partition
            resident += sum(p.local(tp) for p in params if p.local(tp) <= prec.persistence_threshold)
    return {"parameters": resident * b, "master_weights": master * 4, "optimizer_state": 2 * moments * 4}


def teacher_shard_bytes(params: list[ParamInfo], lay: Layout) -> int:
    return 4 * sum(math.ceil(p.local(lay.tp) / lay.dp) for p in params if p.unit != "predictor")


def _units(params: list[ParamInfo], tp: int) -> list[int]:
    """Elements of the modules gathered one at a time (embedding, each layer, final norm, head)."""
    by: dict[tuple[str, int], int] = {}
    for p in params:
        if p.unit != "predictor":
            by[(p.unit, p.layer)] = by.get((p.unit, p.layer), 0) + p.local(tp)
    return list(by.values()) or [0]


def gradient_bytes(numel: int, lay: Layout, prec: Precision) -> int:
    """Estimate: gradient buffers at the accumulation boundary (DeepSpeed stage_1_and_2 / stage3)."""
    b, dp = prec.param_bytes, lay.dp
    part = math.ceil(numel / dp)
    bucket = min(prec.reduce_bucket, numel) * b
    if lay.zero == 0:
        return numel * b
    if lay.zero == 1:  # (under PP the gradients move into a reduce bucket: the same bytes)
        return numel * b + part * 4
    if lay.zero == 2:
        return part * (b + 4) + bucket
    return part * 4 + bucket


def optimizer_step_bytes(params: list[ParamInfo], lay: Layout, impl: str) -> int:
    """Estimate: torch AdamW's temporaries at the step, by kernel (`train.optimizer_impl`; measured in
    `tests/plan/test_plan.py`). Fused: none. For-loop: two fp32 tensors (the second moment's sqrt, then its
    scaled copy) the size of one tensor it steps. Foreach: one fp32 tensor per tensor of a group, at once.
    What it steps: under ZeRO a group's flat partition, else each parameter."""
    if impl == "fused":
        return 0
    tp, dp = lay.tp, lay.dp
    groups = [[p for p in params if p.matrix], [p for p in params if not p.matrix]]
    if lay.zero == 0:
        tensors = [[p.local(tp) for p in g] for g in groups]
    elif lay.zero in (1, 2):
        tensors = [[_align(sum(p.local(tp) for p in g), 2 * dp) // dp] for g in groups]
    else:
        tensors = [[sum(math.ceil(p.local(tp) / dp) for p in g)] for g in groups]
    if impl == "for-loop":
        return 2 * 4 * max((n for g in tensors for n in g), default=0)
    return 4 * max(sum(g) for g in tensors)


def forward_gradient_bytes(numel: int, lay: Layout, prec: Precision, gas: int) -> int:
    """Estimate: the part of `gradient_bytes` alive during a forward. ZeRO-2/3 allocate their reduce bucket (and
    ZeRO-3 its flat fp32 gradient partition) at start and keep it; with gradient accumulation the gradients of
    earlier micro-batches (ZeRO-0/1: whole, ZeRO-2: their partition) wait for the step."""
    b, part = prec.param_bytes, math.ceil(numel / lay.dp)
    bucket = min(prec.reduce_bucket, numel) * b
    accumulating = gas > 1
    if lay.zero in (0, 1):
        return numel * b if accumulating else 0
    if lay.zero == 2:
        return bucket + (part * b if accumulating else 0)
    return part * 4 + bucket


def layer_activation_bytes(cfg: Config, lay: Layout, prec: Precision, recompute: str) -> int:
    """Activations one decoder layer keeps for backward, per micro-batch (Korthikanti et al. 2022, with
    e-byte activations and 1-byte dropout masks: 16e+2 bytes per s*b*h element, 2e+1 per score)."""
    m = cfg.model
    s, b, h, a, t, e = m.seq_length, lay.micro_batch, m.hidden_size, m.num_attention_heads, lay.tp, prec.param_bytes
    sbh = s * b * h
    masks = 2 if m.dropout > 0 else 0
    replicated = (4 * e + masks) * sbh  # two LayerNorm inputs, QKV and fc1 inputs, two dropout masks
    split = 12 * e * sbh  # Q, K, V, projection input, GeLU input, fc2 input
    scores = 0 if prec.flash_attention else (2 * e + (1 if m.dropout > 0 else 0)) * a * s * s * b
    if lay.sequence_parallel:
        replicated //= t
    per_layer = replicated + split // t + scores // t
    if recompute == "selective":  # the attention core is recomputed: its s x s scores are not kept
        per_layer -= scores // t
    if recompute == "full":  # only the layer's input is kept
        per_layer = e * sbh // (t if lay.sequence_parallel else 1)
    return per_layer


def micro_batch_activations(cfg: Config, lay: Layout, prec: Precision, stage: int, recompute: str) -> int:
    """Estimate: everything a micro-batch keeps alive on one stage until its backward."""
    m = cfg.model
    s, b, h, e, t = m.seq_length, lay.micro_batch, m.hidden_size, prec.param_bytes, lay.tp
    layers = m.num_layers // lay.pp
    sbh = s * b * h // (t if lay.sequence_parallel else 1)
    total = layers * layer_activation_bytes(cfg, lay, prec, recompute)
    if recompute == "full":  # backward re-runs one layer at a time: its activations exist once
        total += layer_activation_bytes(cfg, lay, prec, "none")
    # alignment: predictor activations (3 per aligned layer) and the teacher's hidden state of each layer
    total += layers * 4 * e * sbh
    if stage == 0:
        total += 2 * e * sbh  # embedding output and its dropout
    if stage == lay.pp - 1:
        vocab = s * b * m.vocab_size // t
        # student and teacher logits (compute dtype) and the final norm's input and output, then the losses
        total += 2 * e * vocab + 2 * e * sbh
        # fused LM + KD (`distill/fused_lm_kd.py`, also on the pipeline's last stage): the gradient it keeps (the
        # probabilities with KD's term folded in) in fp32, and at most 3 fp32 chunk temporaries at once (5 when
        # the logits need fp32 copies)
        chunk = min(vocab, max(1, prec.loss_chunk // (m.vocab_size // t)) * (m.vocab_size // t))
        total += 4 * vocab + (3 if e == 4 else 5) * 4 * chunk
    return total


def plan_stage(cfg: Config, inv: list[ParamInfo], lay: Layout, prec: Precision, stage: int, gas: int) -> StagePlan:
    params = stage_params(inv, cfg.model.num_layers, lay.pp, stage)
    numel = sum(p.local(lay.tp) for p in params)
    st = StagePlan(stage=stage, params_numel=numel)
    st.exact = model_state_bytes(params, lay, prec)
    st.exact["teacher_shard"] = teacher_shard_bytes(params, lay)
    e = prec.param_bytes
    units = _units(params, lay.tp)
    teacher_whole = sum(p.local(lay.tp) for p in params if p.unit != "predictor")
    st.estimated["gradients"] = gradient_bytes(numel, lay, prec)
    st.estimated["optimizer_step"] = optimizer_step_bytes(params, lay, cfg.train.optimizer_impl)
    st.forward_gradients = forward_gradient_bytes(numel, lay, prec, gas)
    # the teacher forward: over DP > 1 it all-gathers its slices in the compute dtype into one buffer (in place),
    # then one copy joins each parameter's slices, both alive at the end of the gather (and while a module runs,
    # its joined copy and the next module's buffer, being gathered, are alive: no more); at DP = 1 it reads its
    # fp32 shard (views in fp32, a 16-bit cast otherwise). One module at a time, in the middle of the step; or the
    # whole stage module by module at its start, before any activation exists, then held (under PP or with
    # distill.teacher_gather=step)
    kept = e if lay.dp > 1 or e != 4 else 0
    if gathered_per_step(cfg):
        st.estimated["teacher_gathered"] = teacher_whole * kept
        st.teacher_all_gather = teacher_whole * e if lay.dp > 1 else 0
    else:
        st.estimated["teacher_gathered"] = max(units) * (2 * e if lay.dp > 1 else kept)
        st.teacher_all_gather = teacher_whole * e * gas if lay.dp > 1 else 0  # every module, every micro-batch
    if lay.zero == 3:  # the module running and the one prefetched
        st.estimated["zero3_gathered"] = 2 * max(units) * e
    st.activation_per_micro = {r: micro_batch_activations(cfg, lay, prec, stage, r) for r in RECOMPUTE}
    # DeepSpeed's 1F1B schedule keeps min(stages - stage, micro-batches) in flight on a stage
    st.inflight = min(lay.pp - stage, gas) if lay.pp > 1 else 1
    st.estimated["activations"] = st.inflight * st.activation_per_micro[lay.recompute]
    if lay.pp > 1 and stage == lay.pp - 1:
        # the schedule keeps at least two pipe buffers: on the last stage the previous micro-batch's outputs
        # (student and teacher logits) stay in one while the next runs, and after the step
        vocab = cfg.model.seq_length * lay.micro_batch * cfg.model.vocab_size // lay.tp
        st.estimated["pipeline_buffers"] = (min(max(2, st.inflight), gas) - 1) * 2 * e * vocab
    # init: every rank builds its stage's student (ZeRO-3: its partition) and teacher in the compute dtype;
    # under PP also each unit of the other stages, one at a time, dropped once built (`model/stage_init.py`);
    # plus megatron's whole fp32 master of one matrix (of any stage: all are built)
    held = {id(p) for p in params}
    passing = max(_units([p for p in inv if id(p) not in held], lay.tp)) * e if lay.pp > 1 else 0
    biggest = max(p.numel for p in inv) * 4
    student_built = st.exact["parameters"] if lay.zero == 3 else numel * e
    # ZeRO-3 allocates its gradient reduce bucket (contiguous_gradients: reduce_bucket elements, whatever the model
    # size) when the engine is built
    bucket = prec.reduce_bucket * e if lay.zero == 3 else 0
    st.init_peak = (student_built + numel * e + passing + st.exact["teacher_shard"] + biggest
                    + st.exact["master_weights"] + (st.exact["parameters"] if lay.zero in (1, 2) else 0) + bucket)
    return st


def plan_layout(cfg: Config, inv: list[ParamInfo], lay: Layout, prec: Precision) -> list[StagePlan]:
    gas = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    return [plan_stage(cfg, inv, lay, prec, stage, gas) for stage in range(lay.pp)]
