"""Tokenizer training, card, loading and the vocabulary check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import file_sha256
from sdt_dist.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer


def test_card_describes_the_model(tokenizer_model: Path, small_vocab: int) -> None:
    card = json.loads(tokenizer_model.with_name("sdt_tokenizer.json").read_text())
    tok = load_tokenizer(tokenizer_model)
    assert card["vocab_size"] == tok.vocab_size == small_vocab
    assert card["sha256"] == file_sha256(tokenizer_model) == tok.sha256
    assert card["special_ids"] == {"unk": 0, "eod": 1, "pad": 2}
    assert (tok.eod, tok.pad) == (1, 2)
    assert card["byte_fallback"] is True
    assert card["training_sample"]["docs"] == 1000 and card["training_sample"]["bytes"] > 4_000_000


def test_text_survives_encoding(tokenizer_model: Path) -> None:
    tok = load_tokenizer(tokenizer_model)
    text = "  Ünïcödé, 漢字 and emoji 🚀\n\ttabs\r\n  double  spaces\n"  # rare chars: byte fallback
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eod not in ids and tok.encode("<|endoftext|>") != [tok.eod]  # text cannot forge an EOD


def test_vocab_too_large_for_sample_is_a_clear_error(owt_path: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--vocab-size 200000 is too large .* at most \d+ pieces"):
        train_tokenizer(str(owt_path), tmp_path, vocab_size=200_000, sample_mb=0.5)
    assert not (tmp_path / "tokenizer.model").exists()


def test_check_vocab_refuses_a_larger_tokenizer(prepared, small_vocab: int) -> None:
    assert check_vocab(prepared.out_dir, small_vocab) == small_vocab
    assert check_vocab(prepared.out_dir, 50304) == small_vocab
    with pytest.raises(DataError, match=rf"vocabulary \({small_vocab}\) exceeds the model's vocab_size \(4000\)"):
        check_vocab(prepared.out_dir, 4000)


def test_prepared_dir_refuses_a_swapped_tokenizer(prepared, tmp_path: Path, owt_path: Path, small_vocab: int) -> None:
    copy = tmp_path / "prepared"
    shutil.copytree(prepared.out_dir, copy)
    assert load_tokenizer(copy).sha256 == prepared.manifest["tokenizer"]["sha256"]
    other = train_tokenizer(str(owt_path), tmp_path / "other", vocab_size=small_vocab // 2, sample_mb=1)
    shutil.copyfile(other, copy / "tokenizer" / "tokenizer.model")
    with pytest.raises(DataError, match="tokenized by another tokenizer"):
        load_tokenizer(copy)


def test_a_card_under_the_old_name_still_counts_and_is_copied_in_under_the_new(tokenizer_model: Path,
                                                                              small_vocab: int,
                                                                              tmp_path: Path) -> None:
    from sdt_dist.data.shards import _copy_tokenizer
    from sdt_dist.data.tokenizer import CARD_NAME, card_path, trained_tokenizer_ok

    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(tokenizer_model, old / "tokenizer.model")
    shutil.copy(tokenizer_model.with_name(CARD_NAME), old / "tokenizer.json")  # a directory from before the rename
    assert card_path(old) == old / "tokenizer.json" and trained_tokenizer_ok(old, small_vocab)
    copied = tmp_path / "prepared"
    copied.mkdir()
    _copy_tokenizer(load_tokenizer(old), copied)
    assert (copied / "tokenizer" / CARD_NAME).read_bytes() == (old / "tokenizer.json").read_bytes()
    assert not (copied / "tokenizer" / "tokenizer.json").exists()
    # a Hugging Face tokenizer.json is not our card: the tokenizer counts as unfinished (retrained), not misread
    (old / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {}}))
    assert card_path(old) is None and not trained_tokenizer_ok(old, small_vocab)
