"""Training-side loader: megatron-core GPTDataset samples, blending, determinism, DP slicing, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sdt_dist.data.errors import DataError
from sdt_dist.data.loader import MicroBatchIterator, build_datasets, text_file_dataset
from sdt_dist.data.shards import BuildReport, build_shards
from sdt_dist.data.tokenizer import load_tokenizer

SEQ = 64


@pytest.fixture(scope="module")
def owt_datasets(prepared: BuildReport, tmp_path_factory: pytest.TempPathFactory):
    return build_datasets([prepared.out_dir], None, seq_length=SEQ, seed=7, num_train_samples=600,
                          num_valid_samples=40, cache_dir=tmp_path_factory.mktemp("cache"))


def samples(dataset, n: int) -> list[torch.Tensor]:
    return [dataset[i]["tokens"] for i in range(n)]


def test_items_are_next_token_samples(owt_datasets, prepared: BuildReport) -> None:
    train, valid = owt_datasets
    assert len(train) >= 600 and len(valid) >= 40
    vocab = prepared.manifest["tokenizer"]["vocab_size"]
    for dataset in (train, valid):
        item = dataset[3]
        assert item["tokens"].shape == item["labels"].shape == item["loss_mask"].shape == (SEQ,)
        assert item["tokens"].dtype == item["labels"].dtype == torch.int64
        assert item["loss_mask"].dtype == torch.float32 and bool((item["loss_mask"] == 1).all())
        assert torch.equal(item["tokens"][1:], item["labels"][:-1])
        assert 0 <= int(item["tokens"].min()) and int(item["tokens"].max()) < vocab


def test_sample_order_is_fixed_by_the_seed(owt_datasets, prepared: BuildReport, tmp_path: Path) -> None:
    train, _ = owt_datasets
    again, _ = build_datasets([prepared.out_dir], None, seq_length=SEQ, seed=7, num_train_samples=600,
                              num_valid_samples=0, cache_dir=tmp_path / "fresh-cache")
    assert all(torch.equal(a, b) for a, b in zip(samples(train, 50), samples(again, 50), strict=True))
    other, _ = build_datasets([prepared.out_dir], None, seq_length=SEQ, seed=8, num_train_samples=600,
                              num_valid_samples=0, cache_dir=tmp_path / "fresh-cache")
    assert not all(torch.equal(a, b) for a, b in zip(samples(train, 50), samples(other, 50), strict=True))


def test_blend_follows_the_weights(prepared: BuildReport, shakespeare_path: Path, tmp_path: Path) -> None:
    shakespeare = build_shards(str(shakespeare_path), tmp_path / "shakespeare", prepared.out_dir / "tokenizer",
                               workers=0, progress=False).out_dir
    train, valid = build_datasets([prepared.out_dir, shakespeare], [0.7, 0.3], seq_length=SEQ, seed=1,
                                  num_train_samples=2000, num_valid_samples=100, cache_dir=tmp_path / "cache")
    from_shakespeare = [str(shakespeare.resolve()) in ds.dataset_path for ds in train.datasets]
    ids = torch.tensor([int(train[i]["dataset_id"]) for i in range(2000)])
    share = sum(int((ids == k).sum()) for k, yes in enumerate(from_shakespeare) if yes) / 2000
    assert share == pytest.approx(0.3, abs=0.01)
    assert len(valid) >= 100


def test_different_tokenizers_cannot_be_blended(prepared: BuildReport, shakespeare_path: Path,
                                                tmp_path: Path) -> None:
    from sdt_dist.data.tokenizer import train_tokenizer

    tok = train_tokenizer(str(shakespeare_path), tmp_path / "tok", vocab_size=512)
    other = build_shards(str(shakespeare_path), tmp_path / "s", tok, workers=0, progress=False).out_dir
    with pytest.raises(DataError, match="another tokenizer"):
        build_datasets([prepared.out_dir, other], None, seq_length=SEQ, seed=1, num_train_samples=10,
                       num_valid_samples=0, cache_dir=tmp_path / "cache")


def test_truncated_shard_is_refused_before_training(prepared: BuildReport, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(prepared.out_dir, copy)
    with open(copy / "valid-00000.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"valid-00000\.bin: 1000 bytes but the manifest records"):
        build_datasets([copy], None, seq_length=SEQ, seed=1, num_train_samples=10, num_valid_samples=10)
    assert not (copy / "cache").exists()


def test_dp_ranks_split_each_global_batch(owt_datasets) -> None:
    train, _ = owt_datasets
    mbs, dp, consumed = 2, 3, 12
    iterators = [MicroBatchIterator(train, micro_batch_size=mbs, dp_rank=r, dp_size=dp, consumed_samples=consumed)
                 for r in range(dp)]
    for step in range(4):
        indices = [it.next_indices() for it in iterators]
        batches = [next(it) for it in iterators]
        flat = [i for rank in indices for i in rank]
        assert len(set(flat)) == len(flat)  # disjoint
        assert flat == list(range(consumed + step * mbs * dp, consumed + (step + 1) * mbs * dp))  # = the global batch
        for rank, batch in zip(indices, batches, strict=True):
            assert batch["tokens"].shape == (mbs, SEQ)
            assert torch.equal(batch["tokens"], torch.stack([train[i]["tokens"] for i in rank]))
    assert all(it.consumed_samples == consumed + 4 * mbs * dp for it in iterators)


def test_resume_at_consumed_samples_continues_exactly(owt_datasets) -> None:
    train, _ = owt_datasets
    reference = MicroBatchIterator(train, micro_batch_size=4, dp_rank=1, dp_size=2)
    expected = [next(reference)["tokens"] for _ in range(8)]
    first = MicroBatchIterator(train, micro_batch_size=4, dp_rank=1, dp_size=2)
    for _ in range(5):
        next(first)
    assert first.consumed_samples == 5 * 4 * 2
    resumed = MicroBatchIterator(train, micro_batch_size=4, dp_rank=1, dp_size=2,
                                 consumed_samples=first.consumed_samples)
    assert all(torch.equal(next(resumed)["tokens"], expected[k]) for k in range(5, 8))


def test_indices_wrap_around_the_dataset(owt_datasets) -> None:
    train, _ = owt_datasets
    n = len(train)
    it = MicroBatchIterator(train, micro_batch_size=3, dp_rank=0, dp_size=2, consumed_samples=n - 4)
    assert it.next_indices() == [n - 4, n - 3, n - 2]
    next(it)
    assert it.next_indices() == [n - 4 + 6 - n, n - 4 + 7 - n, n - 4 + 8 - n]


def test_text_file_windows(prepared: BuildReport, wikitext_valid_path: Path) -> None:
    tok = load_tokenizer(prepared.out_dir)
    windows = text_file_dataset(wikitext_valid_path, tok, SEQ)
    text = wikitext_valid_path.read_text(encoding="utf-8")
    assert len(windows) == (len(windows.tokens) - 1) // SEQ > 1000
    assert int(windows.tokens[-1]) == tok.eod
    assert tok.decode(windows.tokens[:-1].numpy()) == text
    first, second = windows[0], windows[1]
    assert torch.equal(first["labels"][:-1], first["tokens"][1:])
    assert torch.equal(second["tokens"], windows.tokens[SEQ : 2 * SEQ])  # non-overlapping
    with pytest.raises(IndexError):
        windows[len(windows)]
