"""megatron-core's IndexedDataset files (``.bin`` + ``.idx``, index version 1), written without importing
megatron-core: its module pulls in torch, about 5 CPU-s at every worker's start, more than a slice of
input costs to tokenize. Byte-identical to ``IndexedDatasetBuilder`` with one sequence per document
(``tests/data/test_data_slices.py`` compares them)."""

from __future__ import annotations

import struct

import numpy as np

_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: the code of each token dtype in the index
_DTYPE_CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


class IndexedWriter:
    """Appends documents (one sequence each) to ``bin_path``; ``finalize`` writes the index."""

    def __init__(self, bin_path: str, dtype: type[np.integer]) -> None:
        self.dtype = np.dtype(dtype)
        self._bin = open(bin_path, "wb")
        self._lengths: list[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.asarray(tokens, dtype=self.dtype).tobytes(order="C"))
        self._lengths.append(len(tokens))

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        lengths = np.array(self._lengths, dtype=np.int64)
        pointers = np.concatenate(([0], np.cumsum(lengths)[:-1])) * self.dtype.itemsize
        n = len(lengths)
        with open(idx_path, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", _DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<Q", n))  # sequences
            f.write(struct.pack("<Q", n + 1))  # document boundaries: one sequence per document
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.astype(np.int64).tobytes(order="C"))
            f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))
