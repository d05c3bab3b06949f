"""Fixtures of the data tests: the real corpora under $SDT_SHARED_DATA (default ../shared/data; tests
skip when absent), one small tokenizer, and one OpenWebText-1000 preparation shared by the session."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sdt_dist.data.shards import BuildReport, build_shards
from sdt_dist.data.tokenizer import train_tokenizer
from sdt_dist.paths import owt1000, shared_data_dir

REPO = Path(__file__).resolve().parents[2]
SHARED = shared_data_dir()
TEST_VOCAB = 4096  # small: trains in a second; still a real BPE with byte fallback
DOCS_PER_SHARD = 100  # ~10 train shards from 1000 documents, so blending and resume see several


def shared_file(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not found (set SDT_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def owt_path() -> Path:
    path = owt1000()  # shipped in data/: present unless SDT_SHARED_DATA names a folder without it
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def wikitext_valid_path() -> Path:
    return shared_file("wikitext-2/valid.txt")


@pytest.fixture(scope="session")
def small_vocab() -> int:
    return TEST_VOCAB


@pytest.fixture(scope="session")
def owt_docs(owt_path: Path) -> list[str]:
    """The documents read independently of the pipeline under test."""
    with gzip.open(owt_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="session")
def tokenizer_model(owt_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(str(owt_path), tmp_path_factory.mktemp("tokenizer"), vocab_size=TEST_VOCAB, threads=2)


@pytest.fixture(scope="session")
def prepared(owt_path: Path, tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    # In-process (workers=0): no subprocess outside the slow tests; test_data_shards checks that
    # worker processes produce the very same bytes.
    out = tmp_path_factory.mktemp("prepared") / "owt"
    return build_shards(
        str(owt_path), out, tokenizer_model, workers=0, docs_per_shard=DOCS_PER_SHARD, progress=False
    )
