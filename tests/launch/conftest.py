"""Fixtures of the launch-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import OWT


@pytest.fixture(scope="session")
def launch_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenWebText-1000 prepared once; a 512-piece tokenizer trains faster than tiny.yaml's 4096 and fits
    its 4096-entry model vocabulary."""
    if not OWT.is_file():
        pytest.skip(f"{OWT} not present")
    from sdt_dist.data.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("launch-data") / "owt1000-sp512"
    prepare_corpus(str(OWT), out, vocab_size=512, workers=2, progress=False)
    return out
