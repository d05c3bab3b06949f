"""Layout-independent model export: full (TP-gathered, ZeRO-gathered) weights as safetensors.

A checkpoint is tied to its parallel layout (ZeRO partitions, TP shards); an export is not. Evaluation,
pruning studies and downstream use load an export on any number of ranks (TP = 1 by default).
Files: `<dir>/student.safetensors`, `<dir>/teacher.safetensors`, `<dir>/model_config.json`, all mode 0644
(safetensors writes 0600; clusters share run folders). `sdt-export-hf` turns an export into a Hugging Face folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from sdt_dist.config import ModelConfig, ParallelConfig
from sdt_dist.model import GPTModel, student_layer_specs, transformer_config


def _gather_tp(t: torch.Tensor, like: torch.nn.Parameter, tp_group: dist.ProcessGroup | None) -> torch.Tensor:
    if tp_group is None or dist.get_world_size(tp_group) == 1 or not getattr(like, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, t.contiguous(), group=tp_group)
    return torch.cat(parts, dim=like.partition_dim)


def gather_full_state(named: list[tuple[str, torch.nn.Parameter]], tensors: list[torch.Tensor] | None,
                      tp_group: dist.ProcessGroup | None,
                      pp_group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of `named` (this rank's). `tensors` gives the local (TP-shard) values when they are
    not the params' own (the teacher keeps them in shards); otherwise ZeRO-3 partitions are gathered.
    With `pp_group`, the stages' parts are merged on the group's first rank. Collective."""
    import deepspeed

    out = {}
    for i, (name, p) in enumerate(named):
        if tensors is not None:
            local = tensors[i]
        else:
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                local = p.detach().float().clone()
        out[name] = _gather_tp(local.float(), p, tp_group).cpu().contiguous()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        first = dist.get_process_group_ranks(pp_group)[0]
        parts = [None] * dist.get_world_size(pp_group) if dist.get_rank() == first else None
        dist.gather_object(out, parts, dst=first, group=pp_group)
        out = {k: v for part in parts for k, v in part.items()} if parts is not None else {}
    return out


def export(out_dir: Path, model_cfg: ModelConfig, student: dict[str, torch.Tensor],
           teacher: dict[str, torch.Tensor] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(student, str(out_dir / "student.safetensors"))
    if teacher is not None:
        save_file(teacher, str(out_dir / "teacher.safetensors"))
    (out_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
    for f in out_dir.iterdir():
        os.chmod(f, 0o644)


def locate_export(path: str | Path) -> Path:
    """`path` as an export directory: an export itself, a checkpoint (`<ckpt>/export`) or a run directory (the
    checkpoint `checkpoints/latest` names)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    candidates = [path, path / "export"]
    if latest.is_file():
        candidates.append(path / "checkpoints" / latest.read_text().strip() / "export")
    for c in candidates:
        if (c / "model_config.json").is_file():
            return c
    raise FileNotFoundError(f"{path}: neither an sdt-dist export, a checkpoint nor a run directory with one "
                            f"(no model_config.json in {', '.join(str(c) for c in candidates)})")


def read_model_config(export_dir: Path) -> ModelConfig:
    return ModelConfig(**json.loads((Path(export_dir) / "model_config.json").read_text()))


def checkpoint_tokenizer(export_dir: Path) -> Path:
    """The sentencepiece model the checkpoint around `export_dir` was trained with: from its `meta.json`
    (`data.tokenizer`, else the first prepared directory's), checked against the recorded sha256."""
    from sdt_dist.data.tokenizer import load_tokenizer

    meta_file = Path(export_dir).parent / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{export_dir} is not inside a checkpoint (no {meta_file}): name the tokenizer")
    meta = json.loads(meta_file.read_text())
    data = meta["config"]["data"]
    source = data.get("tokenizer") or (data.get("prepared") or [None])[0]
    if source is None or not Path(source).exists():
        raise FileNotFoundError(f"the tokenizer this checkpoint was trained with ({source}, from {meta_file}) is "
                                f"not found from {Path.cwd()}: name it")
    tok = load_tokenizer(source)
    if tok.sha256 != meta["tokenizer_sha256"]:
        raise ValueError(f"{tok.path} is not the tokenizer {meta_file} records (sha256 {tok.sha256[:12]} vs "
                         f"{meta['tokenizer_sha256'][:12]})")
    return tok.path


def load_export(path: Path, which: str = "student", parallel: ParallelConfig | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[GPTModel, ModelConfig]:
    """A GPTModel (no LayerDrop) with exported weights, for TP = 1 (the default) in eval mode.

    Needs megatron's parallel state initialized (`sdt_dist.parallel.dims.init_parallel(1, 1, 0)`)."""
    path = Path(path)
    if not (path / "model_config.json").is_file():
        raise FileNotFoundError(f"{path} is not an sdt-dist export (no model_config.json)")
    model_cfg = read_model_config(path)
    parallel = parallel or ParallelConfig(tensor=1, pipeline=1, zero_stage=0)
    if parallel.tensor != 1:
        raise ValueError("load_export builds a TP=1 model; shard the state yourself for TP > 1")
    tconf = transformer_config(model_cfg, parallel, dtype)
    gpt = GPTModel(tconf, student_layer_specs([0.0] * model_cfg.num_layers, rope_base=model_cfg.rope_base),
                   model_cfg.vocab_size, model_cfg.tie_embeddings)
    state = load_file(str(path / f"{which}.safetensors"))  # safetensors: no pickle, no code execution
    missing, unexpected = gpt.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("._extra_state")]
    if missing or unexpected:
        raise ValueError(f"{path}/{which}.safetensors does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return gpt.eval(), model_cfg
