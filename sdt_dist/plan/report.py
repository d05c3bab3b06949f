"""A run's plan: memory per rank by pipeline stage, fit on a device, FLOPs and time per step, as text."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdt_dist.config import Config
from sdt_dist.distill.teacher import gathered_per_step
from sdt_dist.eval.compute import flops_per_token
from sdt_dist.plan.devices import Device, GiB
from sdt_dist.plan.inventory import ParamInfo
from sdt_dist.plan.memory import RECOMPUTE, Layout, Precision, StagePlan, model_state_bytes, plan_layout

LABELS = {
    "parameters": "parameters", "gradients": "gradients", "master_weights": "fp32 master weights",
    "optimizer_state": "optimizer state (Adam)", "teacher_shard": "EMA teacher shard (fp32)",
    "teacher_gathered": "teacher weights gathered", "zero3_gathered": "ZeRO-3 weights gathered",
    "activations": "activations", "optimizer_step": "AdamW step temporaries",
    "pipeline_buffers": "pipeline output buffers",
}


@dataclass
class Plan:
    cfg: Config
    layout: Layout
    precision: Precision
    stages: list[StagePlan]
    device: Device | None
    predictors: int  # bytes of the predictors' parameters, masters and Adam state per rank (stage 0)
    flops_per_step: float  # model FLOPs (student fwd+bwd, teacher fwd) per optimizer step, all ranks
    recompute_flops_per_step: float  # extra forward FLOPs of recomputation
    total_params: int  # whole model, predictors included
    nodes: int = 1
    headroom: float = 0.0  # fraction of usable device memory the peak must leave free
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(max(s.steady_peak, s.init_peak) for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.device is None or self.peak <= self.device.usable * (1 - self.headroom)

    def step_time(self, mfu: float) -> float | None:
        if self.device is None or self.precision.param_bytes not in self.device.peak_flops:
            return None
        peak = self.device.peak_flops[self.precision.param_bytes] * self.layout.world
        return (self.flops_per_step + self.recompute_flops_per_step) / (peak * mfu)

    def overflow(self) -> str:
        """The term that overflows: the largest of the stage with the highest peak."""
        stage = max(self.stages, key=lambda s: max(s.steady_peak, s.init_peak))
        if stage.init_peak > stage.steady_peak:
            return (f"the init peak ({stage.init_peak / GiB:.1f} GiB, stage {stage.stage}'s student and teacher built "
                    f"beside the optimizer's copies)")
        terms = {**stage.exact, **stage.estimated}
        name = max(terms, key=terms.get)
        return f"{LABELS[name]} ({terms[name] / GiB:.1f} GiB of {stage.steady_peak / GiB:.1f} GiB, stage {stage.stage})"


def make_plan(cfg: Config, inv: list[ParamInfo], layout: Layout, precision: Precision,
              dev: Device | None, nodes: int = 1, headroom: float = 0.0) -> Plan:
    m, t = cfg.model, cfg.train
    stages = plan_layout(cfg, inv, layout, precision)
    per_layer = sum(p.numel for p in inv if p.unit == "layer" and p.layer == 1)
    fpt = flops_per_token(m, per_layer)
    tokens = t.global_batch_size * m.seq_length
    # student forward + backward (6N + 6Lsd) and the EMA teacher's forward (2N + 2Lsd) per token
    flops = tokens * (fpt["training"] + fpt["forward"])
    layer_fwd = 2.0 * per_layer + 2.0 * m.seq_length * m.hidden_size
    redo = {"none": 0.0, "selective": 4.0 * m.seq_length * m.hidden_size, "full": layer_fwd}[layout.recompute]
    preds = [p for p in inv if p.unit == "predictor" and p.layer <= m.num_layers // layout.pp]
    return Plan(cfg=cfg, layout=layout, precision=precision, stages=stages, device=dev,
                predictors=sum(model_state_bytes(preds, layout, precision).values()),
                flops_per_step=flops, recompute_flops_per_step=tokens * m.num_layers * redo,
                total_params=sum(p.numel for p in inv), nodes=nodes, headroom=headroom)


def _gib(n: float) -> str:
    return f"{n / GiB:9.2f}"


def format_plan(plan: Plan, mfu: float) -> str:
    cfg, lay, m = plan.cfg, plan.layout, plan.cfg.model
    gas = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    dtype = {2: "16-bit", 4: "fp32"}[plan.precision.param_bytes]
    where = f"{plan.nodes} node(s) x {lay.world // plan.nodes} ranks" + (f", {plan.device.name}" if plan.device else "")
    out = [f"sdt-plan (computed, not measured): {lay.world} ranks on {where}",
           f"model: L={m.num_layers} d={m.hidden_size} heads={m.num_attention_heads} s={m.seq_length} "
           f"V={m.vocab_size}, {plan.total_params / 1e9:.3f}B parameters with predictors, {dtype} compute",
           f"layout: {lay.describe()}; global batch {cfg.train.global_batch_size} = {lay.micro_batch} x "
           f"grad-accum {gas} x DP {lay.dp}",
           "per rank, GiB" + "".join(f"   stage {s.stage:>3}" for s in plan.stages[:4])
           + ("   (stages 4.. omitted)" if lay.pp > 4 else "")]
    shown = plan.stages[:4]
    for key in ("parameters", "gradients", "optimizer_step", "master_weights", "optimizer_state", "teacher_shard",
                "teacher_gathered", "zero3_gathered", "activations", "pipeline_buffers"):
        if any(key in s.exact or key in s.estimated for s in shown):
            kind = "exact" if key in shown[0].exact else "estimate"
            vals = "".join(f"  {_gib({**s.exact, **s.estimated}.get(key, 0))}" for s in shown)
            out.append(f"  {LABELS[key]:<28}{vals}   {kind}")
    out.append(f"    of which predictors (stage 0) {_gib(plan.predictors)}   exact (params, masters, Adam)")
    for r in RECOMPUTE:
        vals = "".join(f"  {_gib(s.activation_per_micro[r])}" for s in shown)
        out.append(f"  act./micro-batch, {r:<10}{vals}   estimate")
    out.append("  micro-batches in flight      " + "".join(f"  {s.inflight:9d}" for s in shown))
    out.append("  peak at init                " + "".join(f"  {_gib(s.init_peak)}" for s in shown) + "   estimate")
    out.append("  peak, steady state          " + "".join(f"  {_gib(s.steady_peak)}" for s in shown)
               + "   estimate")
    out.append(f"FLOPs per step: {plan.flops_per_step:.3e} (student fwd+bwd, EMA teacher fwd; Kaplan et al.)"
               + (f" + {plan.recompute_flops_per_step:.3e} recomputation" if plan.recompute_flops_per_step else ""))
    moved = max(s.teacher_all_gather for s in plan.stages)
    if moved:
        how = ("once per step" if gathered_per_step(cfg) or gas == 1 else
               f"one module at a time for each of {gas} micro-batches; distill.teacher_gather=step: once, the whole "
               f"teacher held through the step")
        out.append(f"EMA teacher all-gather per rank and step: {moved / GiB:.2f} GiB over DP {lay.dp} ({how})")
    step = plan.step_time(mfu)
    if step is not None:
        tokens = cfg.train.global_batch_size * m.seq_length
        out.append(f"at {mfu:.0%} of {plan.device.name} peak: {step:.2f} s/step, "
                   f"{tokens / step * 86400 / 1e9:.2f}B tokens/day")
    if plan.device is not None:
        usable = plan.device.usable * (1 - plan.headroom) / GiB
        kept = f" ({plan.headroom:.0%} kept free)" if plan.headroom else ""
        if plan.fits:
            out.append(f"fits: peak {plan.peak / GiB:.1f} GiB of {usable:.1f} GiB usable per device{kept}")
        else:
            out.append(f"DOES NOT FIT: peak {plan.peak / GiB:.1f} GiB > {usable:.1f} GiB usable{kept}; "
                       f"largest: {plan.overflow()}")
    return "\n".join(out + plan.notes)
