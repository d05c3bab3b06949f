"""`train.init_from`: a new run that starts from the weights of an export or a Hugging Face folder.

Continued pretraining: only the student's weights carry over (the teacher starts equal to them, as in any
new run); optimizer state, step, freezing and data position start fresh. The weights go into the freshly built
model before DeepSpeed copies them into its optimizer, each rank taking its TP shard (and, under ZeRO-3, its
partition), so any layout can start from any export. A run that has checkpoints of its own resumes from them
instead (`train.resume`), so a restarted continued-pretraining job does not start over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sdt_dist.config import ConfigError, ModelConfig
from sdt_dist.export import locate_export, read_model_config
from sdt_dist.model.stage_init import holds_weights

_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "tie_embeddings", "rope_base")


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def source_model_config(path: str | Path) -> ModelConfig:
    """The model an export (or run/checkpoint holding one) or a Hugging Face folder describes."""
    from sdt_dist.hf_export import model_config_from_neox

    path = Path(path)
    if is_hf_folder(path):
        return model_config_from_neox(json.loads((path / "config.json").read_text()))
    return read_model_config(locate_export(path))


def source_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Full student weights under GPTModel names."""
    from sdt_dist.hf_export import from_hf_state

    path = Path(path)
    if is_hf_folder(path):
        return from_hf_state(load_file(str(path / "model.safetensors")))
    return load_file(str(locate_export(path) / "student.safetensors"))


def check_compatible(path: str | Path, model: ModelConfig) -> None:
    """ConfigError naming `train.init_from` unless the source has this run's architecture."""
    try:
        src = source_model_config(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"train.init_from: {e}") from None
    ffn = lambda m: m.ffn_hidden_size or 4 * m.hidden_size
    diffs = [f"model.{k} {getattr(model, k)} here, {getattr(src, k)} there" for k in _SHAPE_KEYS
             if getattr(model, k) != getattr(src, k)]
    if ffn(model) != ffn(src):
        diffs.append(f"model.ffn_hidden_size {ffn(model)} here, {ffn(src)} there")
    if diffs:
        raise ConfigError(f"train.init_from: {path} holds another architecture: {'; '.join(diffs)}")


def local_shard(full: torch.Tensor, p: torch.nn.Parameter, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's TP part of a full weight: the inverse of the gather the export does."""
    if tp_group is None or not getattr(p, "tensor_model_parallel", False):
        return full
    return full.chunk(dist.get_world_size(tp_group), dim=p.partition_dim)[dist.get_rank(tp_group)]


@torch.no_grad()
def load_initial_weights(gpt: torch.nn.Module, path: str | Path, model: ModelConfig,
                         tp_group: dist.ProcessGroup | None) -> None:
    """Copy the source's weights into `gpt` (this rank's TP shard; ZeRO-3 partitions through a gather)."""
    import deepspeed

    check_compatible(path, model)
    state = source_weights(path)
    names = [n for n, _ in gpt.named_parameters()]
    missing = sorted(set(names) - set(state))
    if missing:
        raise ConfigError(f"train.init_from: {path} lacks {missing[:3]} ({len(missing)} weights)")
    for name, p in gpt.named_parameters():
        if not holds_weights(p):  # another pipeline stage's
            continue
        local = local_shard(state[name], p, tp_group)
        # ZeRO-3: gather this parameter, set it on every rank of its group, re-partition from rank 0's copy
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            if tuple(p.shape) != tuple(local.shape):
                raise ConfigError(f"train.init_from: {name} is {tuple(local.shape)} there, {tuple(p.shape)} here")
            p.copy_(local.to(p.dtype))
