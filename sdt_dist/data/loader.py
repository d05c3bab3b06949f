"""Training-side data: fixed-length samples from prepared shards through megatron-core's GPTDataset
(blended by weight with BlendedMegatronDatasetBuilder), a data-parallel micro-batch iterator that
resumes at an exact consumed-sample count, and token windows over a raw text file for perplexity.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import manifest_files, verify_prepared
from sdt_dist.data.tokenizer import Tokenizer, load_tokenizer

Blend = tuple[list[str], list[float]]


def _blend(dirs: list[Path], manifests: list[dict[str, Any]], weights: list[float] | None, split: str) -> Blend:
    """Flatten corpus weights into per-shard weights (a corpus's share spread over its shards by tokens)."""
    tokens = [m["splits"][split]["tokens"] for m in manifests]
    corpus_weights = list(map(float, tokens)) if weights is None else [float(w) for w in weights]
    prefixes: list[str] = []
    shard_weights: list[float] = []
    for directory, manifest, weight, total in zip(dirs, manifests, corpus_weights, tokens, strict=True):
        if weight == 0:
            continue
        if total == 0:
            if split == "valid":  # a corpus without validation documents just sits out of the valid blend
                continue
            raise DataError(f"{directory}: has no {split} shards but its blend weight is {weight}")
        for shard in manifest["splits"][split]["shards"]:
            prefixes.append(str(directory.resolve() / shard["name"]))
            shard_weights.append(weight * shard["tokens"] / total)
    if not prefixes:
        raise DataError(f"no {split} shards in {[str(d) for d in dirs]} (valid_fraction 0?)")
    return prefixes, shard_weights


@contextmanager
def _process_group_for_megatron() -> Iterator[None]:
    """megatron-core's BlendedDataset calls torch.distributed.get_rank() whenever it writes its index
    cache; outside a distributed job, lend it a one-process group (in-memory store) meanwhile."""
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_datasets(
    prepared_dirs: Sequence[str | Path],
    weights: list[float] | None,
    *,
    seq_length: int,
    seed: int,
    num_train_samples: int,
    num_valid_samples: int,
    cache_dir: str | Path | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Train and valid datasets of ``seq_length``-token samples over prepared directories.

    Each item is megatron-core's dict: ``tokens`` and ``labels`` (int64, labels = next tokens),
    ``loss_mask`` (float32) and ``position_ids``, each [seq_length]; blended datasets add ``dataset_id``.
    ``weights``: one per directory (None: in proportion to their tokens). The sample order is a
    function of ``seed`` and the data only. The valid dataset is None when ``num_valid_samples`` is 0.

    Index caches go to a subdirectory, named by the data's checksums, of ``cache_dir`` (default: the
    first directory's ``cache/``). With torch.distributed initialised, every rank must call this:
    megatron-core builds the caches on rank 0 first.
    """
    dirs = [Path(prepared_dirs)] if isinstance(prepared_dirs, str | Path) else [Path(d) for d in prepared_dirs]
    if not dirs:
        raise DataError("no prepared directories given")
    if weights is not None and (len(weights) != len(dirs) or min(weights) < 0 or sum(weights) <= 0):
        raise DataError(f"weights {weights} must be one non-negative number per directory, not all zero")
    if seq_length < 1 or num_train_samples < 1 or num_valid_samples < 0:
        raise DataError("seq_length and num_train_samples must be positive, num_valid_samples >= 0")
    manifests = [verify_prepared(d, quick=True) for d in dirs]
    tokenizers = [load_tokenizer(d) for d in dirs]
    for directory, tok in zip(dirs[1:], tokenizers[1:], strict=True):
        if tok.sha256 != tokenizers[0].sha256:
            raise DataError(f"{directory}: tokenized with another tokenizer than {dirs[0]}; cannot blend them")
    train_blend = _blend(dirs, manifests, weights, "train")
    valid_blend = _blend(dirs, manifests, weights, "valid") if num_valid_samples else None

    with warnings.catch_warnings():  # megatron-core warns at import about optional fused kernels
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # megatron-core keys its caches by shard path, not content: a subdirectory per exact data content
    # keeps a rebuilt directory from ever meeting stale indices.
    content = hashlib.sha256(
        "".join(sha for m in manifests for _, _, sha in manifest_files(m)).encode()
    ).hexdigest()[:16]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=[train_blend, valid_blend, None],
        path_to_cache=str((Path(cache_dir) if cache_dir is not None else dirs[0] / "cache") / content),
        tokenizer=tokenizers[0],
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # [s, s] masks per sample; attention kernels build their own
    )
    sizes = [num_train_samples, num_valid_samples or None, None]

    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    with _process_group_for_megatron():
        train, valid, _ = builder.build()
    return train, valid


class MicroBatchIterator:
    """Endless micro-batches of one data-parallel rank, in a globally fixed order.

    Micro-step ``k`` covers global samples ``[c + k*mbs*dp, c + (k+1)*mbs*dp)`` (``c`` = the
    ``consumed_samples`` given), of which rank ``r`` takes the contiguous slice starting at
    ``c + k*mbs*dp + r*mbs``; indices wrap modulo ``len(dataset)``. ``consumed_samples`` counts the
    global samples consumed so far, so a new iterator built with it continues exactly where this one is.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
    ) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
            raise ValueError(
                f"need micro_batch_size >= 1, 0 <= dp_rank < dp_size, consumed_samples >= 0; got "
                f"{micro_batch_size}, {dp_rank}, {dp_size}, {consumed_samples}"
            )
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise DataError("the dataset is empty")
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def next_indices(self) -> list[int]:
        """Dataset indices of this rank's next micro-batch."""
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        size = len(self.dataset)  # type: ignore[arg-type]
        return [(first + i) % size for i in range(self.micro_batch_size)]

    def __iter__(self) -> MicroBatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in self.next_indices()]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        # Tensor fields only: a blend's per-sample dataset_id is a numpy scalar, of no use to a step.
        return {k: torch.stack([item[k] for item in items]) for k, v in items[0].items() if torch.is_tensor(v)}


class TokenWindows(Dataset):
    """Non-overlapping ``seq_length`` windows over one token stream (labels = the next tokens)."""

    def __init__(self, tokens: np.ndarray, seq_length: int) -> None:
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.seq_length = seq_length

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_length

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < len(self):
            raise IndexError(f"window {idx} out of range [0, {len(self)})")
        start = idx * self.seq_length
        window = self.tokens[start : start + self.seq_length + 1]
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length),
        }


def text_file_dataset(path: str | Path, tokenizer: Tokenizer | str | Path, seq_length: int) -> TokenWindows:
    """Tokenize a raw text file (e.g. wikitext-2/valid.txt) as one document ending in EOD, cut into
    non-overlapping ``seq_length`` windows for perplexity evaluation."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    # Line by line, in one batched (multi-threaded) call rather than one giant string. Our tokenizers
    # make "\n" a piece of its own, so the tokens are those of the whole text.
    pieces = text.split("\n")
    lines = [line + "\n" for line in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    ids = tok.encode_batch(lines, num_threads=os.cpu_count() or 1)
    tokens = np.fromiter(chain(chain.from_iterable(ids), [tok.eod]), dtype=np.int64)
    windows = TokenWindows(tokens, seq_length)
    if len(windows) == 0:
        raise DataError(f"{path}: {len(tokens)} tokens, fewer than seq_length + 1 = {seq_length + 1}")
    return windows
