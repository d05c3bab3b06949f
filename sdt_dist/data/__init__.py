"""Data preparation (tokenizer, Megatron-format shards, manifest) and the training-side loader.

Names are re-exported lazily: spawned tokenization workers import this package and must not pay for
the torch / megatron-core / datasets imports that only the main process needs.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DataError": "errors",
    "verify_prepared": "manifest",
    "train_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "build_shards": "shards",
    "merge_parts": "assemble",
    "prepare_corpus": "prepare",
    "build_datasets": "loader",
    "MicroBatchIterator": "loader",
    "text_file_dataset": "loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
