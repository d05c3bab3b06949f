"""Tokenization of document chunks, run in spawned worker processes.

Imported by every worker: keep it to numpy + sentencepiece (no torch, megatron-core or datasets).
"""

from __future__ import annotations

import os
import threading
import time
from itertools import chain
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

from sdt_dist.data.sources import INVALID_UTF8_MARK

_sp: spm.SentencePieceProcessor | None = None
_eod = 0
_dtype: type[np.integer] = np.int32


class EncodedChunk(NamedTuple):
    """One chunk's result: numpy arrays pickle as flat buffers, unlike per-document lists of ints."""

    empty: np.ndarray  # bool per input document: empty or whitespace-only, skipped
    invalid_utf8: np.ndarray  # bool per input document: invalid UTF-8 was replaced by U+FFFD
    lengths: np.ndarray  # int64 per kept document: token count including the trailing EOD
    tokens: np.ndarray  # the kept documents' tokens, each followed by EOD, concatenated


def _exit_with_parent(parent_pid: int) -> None:
    # A worker holds both ends of its task queue, so it never sees EOF when the parent is killed
    # (kill -9 of an interrupted build): without this it would wait forever as an orphan.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def init_worker(model_path: str, dtype_name: str, parent_pid: int | None = None) -> None:
    """Load the model; in a worker process (``parent_pid`` given) also exit when the parent dies."""
    global _sp, _eod, _dtype
    if parent_pid is not None:
        threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    _sp = spm.SentencePieceProcessor(model_file=model_path)
    _eod = _sp.eos_id()
    _dtype = np.dtype(dtype_name).type


def encode_chunk(texts: list[str]) -> EncodedChunk:
    assert _sp is not None, "init_worker() was not called"
    n = len(texts)
    invalid = np.fromiter((INVALID_UTF8_MARK in t for t in texts), dtype=bool, count=n)
    if invalid.any():
        texts = [t.replace(INVALID_UTF8_MARK, "\ufffd") if bad else t for t, bad in zip(texts, invalid)]
    empty = np.fromiter((not t or t.isspace() for t in texts), dtype=bool, count=n)
    kept = [t for t, e in zip(texts, empty) if not e] if empty.any() else texts
    # One batched call: sentencepiece loops in C++; num_threads=1 because the parallelism is the workers.
    ids = _sp.encode(kept, num_threads=1)
    body = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=_dtype, count=int(body.sum()))
    tokens = np.insert(flat, np.cumsum(body), _dtype(_eod))
    return EncodedChunk(empty, invalid, body + 1, tokens)
