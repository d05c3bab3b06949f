"""Tokenization in spawned worker processes (or in this one), fed with chunks of a few hundred KB of text."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from sdt_dist.data._encode import EncodedChunk, encode_chunk, init_worker


class EncoderPool:
    """encode_chunk in ``workers`` spawned processes, or in this process when ``workers == 0``."""

    def __init__(self, workers: int, model_path: Path, dtype: type[np.integer]) -> None:
        model, dtype_name = str(model_path), np.dtype(dtype).name
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            # spawn, not fork: the parent runs pyarrow and tqdm threads whose locks a fork would copy.
            # ProcessPoolExecutor rather than Pool: a worker killed by the OOM killer raises, not hangs.
            self._pool = ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                initargs=(model, dtype_name, os.getpid()),
            )
        else:
            init_worker(model, dtype_name)

    def submit(self, texts: list[str]) -> Future[EncodedChunk]:
        if self._pool is not None:
            return self._pool.submit(encode_chunk, texts)
        done: Future[EncodedChunk] = Future()
        done.set_result(encode_chunk(texts))
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def chunks(batches: Iterable[list[str]], chunk_chars: int) -> Iterator[list[str]]:
    """Regroup reader batches into chunks of about ``chunk_chars`` characters."""
    chunk: list[str] = []
    size = 0
    for texts in batches:
        for text in texts:
            chunk.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk
