"""Compute accounting of a run: parameters, FLOPs per token, tokens seen, accelerator-hours, and the
compute that progressive freezing (and LayerDrop) saved.

FLOPs follow Kaplan et al. (2020): a matmul with N weights costs 2N FLOPs per token forward, and
attention adds 2*s*d per layer and token (QK^T and AV over a context of s). With
  N_layer = weights of one decoder layer, N_head = d * V (the output projection, tied or not),
  N     = L * N_layer + N_head  (embedding lookups cost no FLOPs),
a forward pass costs 2N + 2*L*s*d per token and a training step 3x that, 6N + 6*L*s*d (backward = 2x
forward). Norms, softmax, residuals and the optimizer are left out (a few % at these sizes).

A SelfDistil-T step per token (student with LayerDrop and freezing, plus the EMA teacher):
  student forward   sum over layers that ran of (2 N_layer + 2 s d), + 2 N_head
  student backward  2x the forward of the layers that ran and are not frozen, + 4 N_head; frozen layers
                    1..k cost nothing when the embedding is frozen too (they run without autograd, backward
                    stops at the boundary), else 1x their forward (input gradients only, on to the embedding)
  teacher forward   2N + 2 L s d, when a distillation term is on (lambda_kd > 0 or lambda_sd > 0), less the
                    forward of the layers it takes from the student's frozen trunk (`distill/shared_trunk.py`)
  predictors        12 d^2 per aligned layer that ran: Linear(d, d) twice, forward 4 d^2, backward twice that
The frozen count, the shared trunk and the dropped layers of every micro-step are pure functions of (config,
step) (`schedules.frozen_layers_at`, `shared_trunk.scheduled_shared_layers`, `layerdrop.sample_dropped`), so
the totals are exact for the run's schedule; the logged `frozen_layers` are checked against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdt_dist.config import Config, ModelConfig, check_layout
from sdt_dist.distill.layerdrop import layer_probs
from sdt_dist.distill.schedules import aligned_layers_at, frozen_layers_at
from sdt_dist.distill.shared_trunk import scheduled_shared_layers
from sdt_dist.distill.step_plan import StepPlan
from sdt_dist.metrics import read_metrics
from sdt_dist.model import GPTModel

FLOPS_FORMULA = (
    "forward/token = 2N + 2*L*s*d; training/token = 6N + 6*L*s*d (Kaplan et al. 2020), N = L*N_layer + d*V "
    "(decoder + output-projection weights; embedding lookups excluded). SelfDistil-T step: student forward "
    "over the layers that ran + backward (2x forward) over the ones that ran unfrozen (1x over frozen ones when "
    "the embedding trains) + output head fwd/bwd, "
    "+ EMA-teacher forward (2N + 2Lsd, less the layers shared with the student's frozen trunk) when lambda_kd > 0 "
    "or lambda_sd > 0, + 12d^2 per aligned layer that ran (predictors, forward and backward); norms, softmax "
    "and the optimizer excluded"
)


def parameter_counts(gpt: GPTModel) -> dict[str, int]:
    """Parameter counts of a (TP = 1) model, by part."""
    layer = sum(p.numel() for p in gpt.layers[0].parameters())
    embedding = sum(p.numel() for p in gpt.embedding.parameters())
    head = 0 if gpt.tie_embeddings else sum(p.numel() for p in gpt.output_layer.parameters())
    total = sum(p.numel() for p in gpt.parameters())
    return {"total": total, "embedding": embedding, "output_head": head, "per_layer": layer,
            "decoder_layers": layer * gpt.num_layers, "non_embedding": total - embedding - head}


def layer_params(m: ModelConfig) -> int:
    """Weights of one decoder layer from the config (what `parameter_counts` counts on a built TP = 1 model):
    QKV, projection, fc1 and fc2 with biases, and two LayerNorms."""
    d, f = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size
    return 4 * d * d + 2 * d * f + 9 * d + f


def flops_per_token(m: ModelConfig, per_layer_params: int) -> dict[str, float]:
    """Forward and training FLOPs per token of a plain GPT step (see the module docstring)."""
    n = m.num_layers * per_layer_params + m.hidden_size * m.vocab_size
    attn = 2 * m.num_layers * m.seq_length * m.hidden_size
    return {"N": float(n), "forward": 2.0 * n + attn, "training": 6.0 * n + 3 * attn}


def _sdt_step_flops(m: ModelConfig, per_layer_params: int, ran: int, ran_trainable: int, teacher: bool,
                    ran_input_grad_only: int = 0, shared: int = 0, predicted: int = 0) -> float:
    layer_fwd = 2.0 * per_layer_params + 2.0 * m.seq_length * m.hidden_size
    head_fwd = 2.0 * m.hidden_size * m.vocab_size
    student = (ran * layer_fwd + head_fwd + 2 * (ran_trainable * layer_fwd + head_fwd)
               + ran_input_grad_only * layer_fwd)
    predictors = 12.0 * m.hidden_size * m.hidden_size * predicted
    return student + predictors + ((m.num_layers - shared) * layer_fwd + head_fwd if teacher else 0.0)


def step_flops(cfg: Config, per_layer_params: int, dp: int, step: int, frozen: int, shared_trunk: int = 0) -> float:
    """Training FLOPs of one optimizer step on all ranks together (0-based `step`, as train_step sees it) with
    `frozen` layers frozen, the teacher sharing `shared_trunk` of them (`StepPlan.shared_trunk`) and the
    LayerDrop of each micro-step as drawn."""
    m, d, t = cfg.model, cfg.distill, cfg.train
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    tokens_per_micro = t.micro_batch_size * dp * m.seq_length
    plan = StepPlan(step=step, training=True, shared_trunk=shared_trunk, seed=t.seed,
                    drop_probs=tuple(layer_probs(d.layerdrop_p, m.num_layers, d.layerdrop_schedule)))
    aligned = aligned_layers_at(step, d, m.num_layers, t.max_steps, frozen)
    teacher = d.lambda_kd > 0 or bool(aligned)
    total = 0.0
    for micro in range(gas):
        dropped = plan.dropped(micro)
        ran = m.num_layers - len(dropped)
        trainable = sum(1 for n in range(frozen + 1, m.num_layers + 1) if n not in dropped)
        # a trainable embedding below frozen layers needs their input gradients
        input_grad_only = 0 if d.freeze_embedding else ran - trainable
        predicted = sum(1 for n in aligned if n not in dropped)
        total += tokens_per_micro * _sdt_step_flops(m, per_layer_params, ran, trainable, teacher, input_grad_only,
                                                    plan.shared(micro), predicted)
    return total


def schedule_flops(cfg: Config, per_layer_params: int, world_size: int, steps: int | None = None) -> dict[str, Any]:
    """Training FLOPs of the run's first `steps` steps (default max_steps) as scheduled, with and without
    freezing, and the frozen-layer timeline [(first step, frozen layers), ...] (steps 1-based)."""
    m, d, t = cfg.model, cfg.distill, cfg.train
    steps = t.max_steps if steps is None else steps
    dp = check_layout(cfg, world_size)
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    tokens_per_micro = t.micro_batch_size * dp * m.seq_length
    total = no_freeze = 0.0
    timeline: list[tuple[int, int]] = []
    for step in range(steps):  # step index as train_step sees it; logged as step + 1
        frozen = frozen_layers_at(step, d, m.num_layers, t.max_steps)
        if not timeline or timeline[-1][1] != frozen:
            timeline.append((step + 1, frozen))
        total += step_flops(cfg, per_layer_params, dp, step, frozen, scheduled_shared_layers(cfg, step))
        no_freeze += step_flops(cfg, per_layer_params, dp, step, 0)
    plain = flops_per_token(m, per_layer_params)["training"] * tokens_per_micro * gas * steps
    return {"train_flops": total, "train_flops_without_freezing": no_freeze,
            "train_flops_plain_gpt": plain, "freezing_compute_ratio": total / no_freeze if no_freeze else 1.0,
            "frozen_timeline": timeline}


def logged_time(records: list[dict[str, Any]]) -> float:
    """Seconds of training steps: only logged steps carry `step_time_s`, so each logged step's time
    stands for the unlogged steps since the previous logged one."""
    total, prev = 0.0, 0
    for r in records:
        total += (r["step"] - prev) * r["step_time_s"]
        prev = r["step"]
    return total


def run_compute(cfg: Config, meta: dict[str, Any], run_dir: Path | None, params: dict[str, int]) -> dict[str, Any]:
    """The compute section of an evaluation report for a checkpoint with `meta` (its meta.json)."""
    m = cfg.model
    world = int(meta["world_size"])
    step = int(meta["step"])
    sched = schedule_flops(cfg, params["per_layer"], world, steps=step)
    out: dict[str, Any] = {
        "parameters": params,
        "flops_formula": FLOPS_FORMULA,
        "flops_per_token": flops_per_token(m, params["per_layer"]),
        "steps": step,
        "tokens_seen": int(meta["consumed_samples"]) * m.seq_length,
        "world_size": world,
        "layout": meta.get("layout"),
        **sched,
        "freezing_compute_saved_pct": 100.0 * (1.0 - sched["freezing_compute_ratio"]),
    }
    records = [r for r in read_metrics(run_dir) if r["step"] <= step] if run_dir is not None else []
    if records:
        seconds = logged_time(records)
        out["step_time_s_total"] = seconds
        out["accelerator_hours"] = seconds * world / 3600.0
        out["accelerator_hours_note"] = (
            "sum of logged step_time_s (each logged step standing for the unlogged steps before it) x world "
            "size; excludes start-up, evaluation and checkpointing")
        by_frozen: dict[int, list[float]] = {}
        mismatched = []
        for r in records:
            by_frozen.setdefault(r["frozen_layers"], []).append(r["step_time_s"])
            expected = frozen_layers_at(r["step"] - 1, cfg.distill, m.num_layers, cfg.train.max_steps)
            if r["frozen_layers"] != expected:
                mismatched.append(r["step"])
        out["mean_step_time_s_by_frozen_layers"] = {str(k): sum(v) / len(v) for k, v in sorted(by_frozen.items())}
        out["logged_frozen_matches_schedule"] = not mismatched
    return out
