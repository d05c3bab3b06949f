"""The train/valid assignment: a seeded hash of a document's identity, so that it never depends on workers,
slicing into parts, chunking or resume."""

from __future__ import annotations

import numpy as np


def _splitmix64(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def assign_valid(doc_ids: np.ndarray, seed: int, valid_fraction: float) -> np.ndarray:
    """True for the documents (by identity: ``Slice.positions``; for format-1 directories and a one-file
    input, the 0-based input index) that belong to the validation split."""
    key = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    z = _splitmix64(np.asarray(doc_ids, dtype=np.uint64) ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53 < valid_fraction
