"""Adam state carried across an optimizer rebuild, under any ZeRO stage.

`requires_grad_(False)` alone is wrong under ZeRO 1/2/3 (Adam keeps moving frozen parameters with its
momentum, and their state stays allocated). So freezing rebuilds the optimizer over the kept
parameters: we read every kept parameter's fp32 master weight and Adam moments, build a new engine,
and write them back. This is exact, and frees the frozen parameters' optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO / bf16 wrappers hold the torch optimizer inside


def _master_tensors(engine) -> list[torch.Tensor]:
    """The fp32 tensors the torch optimizer steps: ZeRO's flat partitions, or the parameters themselves."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if getattr(opt, attr, None) is not None:
            return list(getattr(opt, attr))
    return [t for group in _inner_optimizer(engine).param_groups for t in group["params"]]


def _uses_hp_mapping(p: torch.nn.Parameter) -> bool:
    # A ZeRO-1/2 parameter outside this rank's partition has `_hp_mapping = None` but must still join
    # the collective in `safe_get_full_*`: test for the attribute, not its value.
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def snapshot_optimizer_state(engine, params: list[torch.nn.Parameter]) -> dict[str, Any]:
    """Full fp32 weights and Adam moments of `params` (collectives over DP under ZeRO: call on all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    inner = _inner_optimizer(engine)
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if steps and link is not None:
        # DeepSpeed links per-parameter views of the Adam state on demand, and may have linked before the
        # state existed: relink now that it does.
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    snap: dict[str, Any] = {"step": steps[0].clone() if steps else None, "params": []}
    for p in params:
        if _uses_hp_mapping(p):
            entry = {"fp32": safe_get_full_fp32_param(p)}
            if steps:
                entry.update({k: safe_get_full_optimizer_state(p, k) for k in _ADAM_KEYS})
        else:  # ZeRO-0 in fp32: the module parameter is the master and the optimizer keys it directly
            state = inner.state.get(p, {})
            entry = {"fp32": p.detach().clone(), **{k: state[k].clone() for k in _ADAM_KEYS if k in state}}
        snap["params"].append(entry)
    return snap


def restore_optimizer_state(engine, params: list[torch.nn.Parameter], snap: dict[str, Any]) -> None:
    """Write a snapshot into a freshly built engine over the same kept `params`."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    inner = _inner_optimizer(engine)
    if snap["step"] is not None:
        # Adam state is created lazily at the first step; create it now so it can be written.
        for t in _master_tensors(engine):
            inner.state[t] = {"step": snap["step"].clone(), "exp_avg": torch.zeros_like(t),
                              "exp_avg_sq": torch.zeros_like(t)}
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            engine.optimizer._hp_optimizer_states_linked = False
            link()
    with torch.no_grad():
        for p, entry in zip(params, snap["params"]):
            if _uses_hp_mapping(p):
                safe_set_full_fp32_param(p, entry["fp32"])
                for k in _ADAM_KEYS:
                    if k in entry and entry[k] is not None:
                        safe_set_full_optimizer_state(p, entry[k], k)
            else:
                p.copy_(entry["fp32"])
                for k in _ADAM_KEYS:
                    if k in entry:
                        inner.state[p][k].copy_(entry[k])


def optimizer_state_numel(engine) -> int:
    """Elements of optimizer state held on this rank (to show that freezing frees it)."""
    inner = _inner_optimizer(engine)
    return sum(v.numel() for s in inner.state.values() for k, v in s.items() if k in _ADAM_KEYS)
