"""Evaluation of a checkpoint: perplexity, calibration (ECE), pruning degradation and compute.

The model is loaded from the checkpoint's layout-independent export (any training layout, TP = 1 here).
Held-out text is one token stream: the documents of a prepared split in order (each ends in EOD), or a
raw text file tokenized with the run's tokenizer. The stream is cut into non-overlapping windows of
seq_length + 1 tokens overlapping by one (input = window[:-1], labels = window[1:]); the remainder
after the last full window is scored as one shorter window, so every token but the first is predicted
exactly once, with the context since its window's start.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sdt_dist.config import Config, with_legacy_values
from sdt_dist.data.errors import DataError
from sdt_dist.eval.compute import parameter_counts, run_compute
from sdt_dist.eval.metrics import DEFAULT_BINS, EvalAccumulator, token_stats
from sdt_dist.eval.pruning import removed_layers
from sdt_dist.model import GPTModel

PROTOCOL = {
    "perplexity": "token-level: exp(total NLL / scored tokens) over the whole set; non-overlapping windows of "
                  "seq_length predictions (the tail as one shorter window), every token but the first predicted "
                  "exactly once; no overlap / sliding context",
    "ece": "top-1 next-token predictions; confidence = max softmax probability; 10 equal-width bins "
           "((m-1)/10, m/10]; ECE = sum_m n_m/N |accuracy_m - confidence_m|",
    "pruning": "remove k of L layers keeping evenly spaced ones (sdt_dist.distill.layerdrop.evenly_spaced_keep); "
               "removed layers are the identity (LayerDrop's skip); degradation = 100 * (ppl_k / ppl_0 - 1)",
}


@dataclass(frozen=True)
class CheckpointRef:
    export_dir: Path
    step_dir: Path | None  # None when given a bare export
    run_dir: Path | None
    meta: dict[str, Any] | None  # the checkpoint's meta.json


def resolve_checkpoint(path: str | Path) -> CheckpointRef:
    """Accept a run dir (its latest checkpoint), a `checkpoints/` dir, a `step_*` dir or a bare export."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if (path / "model_config.json").is_file():
        return CheckpointRef(path, None, None, None)
    if not (path / "export" / "model_config.json").is_file() or not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{path}: not a run dir, checkpoint (export/ + meta.json) or export")
    meta = json.loads((path / "meta.json").read_text())
    return CheckpointRef(path / "export", path, path.parent.parent, meta)


def run_config(meta: dict[str, Any]) -> Config:
    """The training Config stored in a checkpoint's meta.json (not re-validated: paths may have moved)."""
    default = Config()
    recorded = with_legacy_values(meta["config"])
    return Config(**{f.name: type(getattr(default, f.name))(**recorded[f.name])
                     for f in dataclasses.fields(Config)})


@dataclass(frozen=True)
class EvalData:
    name: str
    tokens: torch.Tensor  # 1-D int64 stream
    source: str
    tokenizer_sha256: str | None


def parse_data_arg(arg: str) -> tuple[str, str, str]:
    """`[NAME=]PATH[@SPLIT]` -> (name, path, split); split is for prepared dirs (default valid)."""
    name, _, rest = arg.rpartition("=") if "=" in arg else ("", "", arg)
    path, _, split = rest.partition("@")
    return name or Path(path).stem, path, split or "valid"


def load_data(name: str, path: str | Path, tokenizer_path: str | Path | None, seq_length: int,
              split: str = "valid") -> EvalData:
    """A prepared directory's split (document order, EOD-terminated) or a raw text file."""
    from sdt_dist.data.loader import text_file_dataset
    from sdt_dist.data.manifest import verify_prepared
    from sdt_dist.data.tokenizer import load_tokenizer

    path = Path(path)
    if path.is_dir():
        manifest = verify_prepared(path, quick=True)
        if split not in manifest["splits"] or not manifest["splits"][split]["shards"]:
            raise DataError(f"{path}: no {split!r} split")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        parts = []
        for shard in manifest["splits"][split]["shards"]:
            ds = IndexedDataset(str(path / shard["name"]))
            parts += [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
        tokens = torch.from_numpy(np.concatenate(parts))
        return EvalData(name, tokens, f"{path} ({split} split, {len(parts)} documents)",
                        manifest["tokenizer"]["sha256"])
    if tokenizer_path is None:
        raise DataError(f"{path}: a raw text file needs a tokenizer (--tokenizer, or a prepared dataset)")
    tok = load_tokenizer(tokenizer_path)
    # seq_length 1: any non-trivial file is accepted; windows are cut here, not by the dataset
    return EvalData(name, text_file_dataset(path, tok, 1).tokens, f"{path} (raw text)", tok.sha256)


@torch.no_grad()
def evaluate_tokens(model: GPTModel, tokens: torch.Tensor, seq_length: int, *, batch_size: int = 8,
                    skip: frozenset[int] = frozenset(), n_bins: int = DEFAULT_BINS,
                    device: torch.device | None = None, desc: str | None = None) -> EvalAccumulator:
    """Score every token of the stream but the first (windows as in the module docstring); with `desc`, a
    progress bar of that name on stderr."""
    device = device or next(model.parameters()).device
    acc = EvalAccumulator(n_bins)
    n_pred = len(tokens) - 1
    full = n_pred // seq_length
    inputs = tokens[: full * seq_length].view(full, seq_length)
    labels = tokens[1 : full * seq_length + 1].view(full, seq_length)
    batches = [(inputs[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, full, batch_size)]
    if n_pred > full * seq_length:
        batches.append((tokens[full * seq_length : -1][None], tokens[full * seq_length + 1 :][None]))
    for x, y in tqdm(batches, desc=desc, unit=" batches", disable=desc is None, dynamic_ncols=True):
        logits = model(x.to(device), skip=skip).logits
        acc.update(token_stats(logits, y.to(device)))
    return acc


def dataset_report(acc: EvalAccumulator, data: EvalData, seq_length: int) -> dict[str, Any]:
    return {"source": data.source, "tokens_scored": acc.tokens, "seq_length": seq_length,
            "windows": -(-acc.tokens // seq_length), "nll": acc.mean_nll, "ppl": acc.perplexity,
            "accuracy": acc.accuracy, "ece": acc.ece, "bins": acc.bins()}


def evaluate_checkpoint(checkpoint: str | Path, data_args: list[str], *, weights: str = "student",
                        tokenizer: str | Path | None = None, prune: list[int] | None = None,
                        prune_data: str | None = None, batch_size: int = 8, max_tokens: int | None = None,
                        n_bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """The full evaluation report of a checkpoint (needs `init_parallel(1, 1, 0)` first).

    `data_args`: `[NAME=]PATH[@SPLIT]` each. `prune`: numbers of layers to remove (0 is added); the curve
    is computed on `prune_data` (default: the first dataset). `max_tokens` caps each stream (recorded)."""
    from sdt_dist.export import load_export
    from sdt_dist.parallel.dims import device

    started = time.perf_counter()
    ref = resolve_checkpoint(checkpoint)
    model, model_cfg = load_export(ref.export_dir, which=weights)
    model = model.to(device())
    cfg = run_config(ref.meta) if ref.meta is not None else None
    parsed = [parse_data_arg(a) for a in data_args]
    if not parsed:
        raise ValueError("name at least one dataset")
    tokenizer = tokenizer or next((p for _, p, _ in parsed if Path(p).is_dir()), None) or _run_tokenizer(cfg)
    datasets: dict[str, EvalData] = {}
    for name, path, split in parsed:
        data = load_data(name, path, tokenizer, model_cfg.seq_length, split)
        _check_tokenizer(ref, data)
        if max_tokens is not None:
            data = EvalData(data.name, data.tokens[: max_tokens + 1], data.source, data.tokenizer_sha256)
        datasets[name] = data

    s = model_cfg.seq_length
    report: dict[str, Any] = {
        "format": "sdt-eval/1", "checkpoint": str(ref.step_dir or ref.export_dir),
        "run_dir": str(ref.run_dir) if ref.run_dir else None, "step": ref.meta["step"] if ref.meta else None,
        "weights": weights, "model": dataclasses.asdict(model_cfg), "protocol": PROTOCOL, "max_tokens": max_tokens,
        "datasets": {},
    }
    accs = {}
    for name, data in datasets.items():
        accs[name] = evaluate_tokens(model, data.tokens, s, batch_size=batch_size, n_bins=n_bins, desc=name)
        report["datasets"][name] = dataset_report(accs[name], data, s)

    prune_name = prune_data or next(iter(datasets))
    if prune_name not in datasets:
        raise ValueError(f"--prune-data {prune_name!r} is not one of the datasets {list(datasets)}")
    removed = sorted({0, *(prune or [])})
    ppl = {0: accs[prune_name].perplexity}
    for k in removed[1:]:
        skip = removed_layers(model_cfg.num_layers, k)
        ppl[k] = evaluate_tokens(model, datasets[prune_name].tokens, s, batch_size=batch_size, skip=skip,
                                 desc=f"{prune_name}, {k} layers removed").perplexity
    report["pruning"] = {
        "dataset": prune_name, "removed": removed,
        "removed_layers": {str(k): sorted(removed_layers(model_cfg.num_layers, k)) for k in removed},
        "ppl": {str(k): v for k, v in ppl.items()},
        "increase_pct": {str(k): 100.0 * (v / ppl[0] - 1.0) for k, v in ppl.items()},
    }
    report["compute"] = (run_compute(cfg, ref.meta, ref.run_dir, parameter_counts(model))
                         if cfg is not None else {"parameters": parameter_counts(model)})
    report["eval_seconds"] = time.perf_counter() - started
    return report


def _run_tokenizer(cfg: Config | None) -> str | None:
    """The tokenizer the run trained with, when its paths still resolve from here."""
    if cfg is None:
        return None
    for candidate in ([cfg.data.tokenizer] if cfg.data.tokenizer else []) + list(cfg.data.prepared):
        if Path(candidate).exists():
            return candidate
    return None


def _check_tokenizer(ref: CheckpointRef, data: EvalData) -> None:
    trained = (ref.meta or {}).get("tokenizer_sha256")
    if trained and data.tokenizer_sha256 and trained != data.tokenizer_sha256:
        raise DataError(f"{data.source}: tokenized with tokenizer {data.tokenizer_sha256[:12]}, but the checkpoint "
                        f"was trained with {trained[:12]}; evaluate with the run's tokenizer")

