"""Shard building on OpenWebText-1000: exact tokens, round trip, split, manifest, resume, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import file_sha256, verify_prepared
from sdt_dist.data.prepare import prepare_corpus
from sdt_dist.data.shards import BuildReport, assign_valid, build_shards
from sdt_dist.data.sources import CorpusSpec, iter_documents, resolve_corpus
from sdt_dist.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]


def shard_documents(out: Path, manifest: dict[str, Any], docs: list[str]) -> dict[int, np.ndarray]:
    """Input document index -> its token sequence in the shards, recomputed from the split rule and
    each shard's document range; fails on a document found twice or a count that does not match."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    seed, fraction = manifest["settings"]["seed"], manifest["settings"]["valid_fraction"]
    found: dict[int, np.ndarray] = {}
    for split in ("train", "valid"):
        for shard in manifest["splits"][split]["shards"]:
            idx = np.arange(shard["first_doc"], shard["end_doc"])
            mine = [int(i) for i in idx[assign_valid(idx, seed, fraction) == (split == "valid")]]
            mine = [i for i in mine if docs[i].strip()]
            dataset = IndexedDataset(str(out / shard["name"]))
            assert len(dataset) == len(mine) == shard["docs"]
            for i, k in zip(mine, range(len(dataset)), strict=True):
                assert i not in found
                found[i] = np.array(dataset[k])
    return found


def test_tokens_are_exactly_the_sentencepiece_encodings(prepared: BuildReport, owt_docs: list[str]) -> None:
    tok = load_tokenizer(prepared.out_dir)
    expected = tok.encode_batch(owt_docs)
    splits = prepared.manifest["splits"]
    assert splits["train"]["tokens"] + splits["valid"]["tokens"] == sum(len(ids) + 1 for ids in expected)
    assert prepared.manifest["input"]["docs"] == 1000 and prepared.manifest["input"]["skipped_empty"] == 0
    found = shard_documents(prepared.out_dir, prepared.manifest, owt_docs)
    assert sorted(found) == list(range(1000))  # every document exactly once
    for i, ids in enumerate(expected):
        assert found[i].tolist() == ids + [tok.eod]


def test_documents_decode_back_to_the_original_text(prepared: BuildReport, owt_docs: list[str]) -> None:
    tok = load_tokenizer(prepared.out_dir)
    found = shard_documents(prepared.out_dir, prepared.manifest, owt_docs)
    for i, text in enumerate(owt_docs):
        # Identity normalisation: exact, but for U+2581, sentencepiece's own space marker.
        assert tok.decode(found[i][:-1]) == (text if "\u2581" not in text else tok.decode(tok.encode(text)))


def test_split_is_a_seeded_deterministic_hash(prepared: BuildReport) -> None:
    idx = np.arange(1000)
    valid = assign_valid(idx, 1234, 0.05)
    assert prepared.manifest["splits"]["valid"]["docs"] == valid.sum()
    assert 20 <= valid.sum() <= 90
    assert (assign_valid(idx[::-1], 1234, 0.05) == valid[::-1]).all()  # depends on the index only
    assert (assign_valid(idx, 99, 0.05) != valid).any()
    assert not assign_valid(idx, 1234, 0.0).any()


def test_layout_and_manifest(prepared: BuildReport) -> None:
    out, manifest = prepared.out_dir, prepared.manifest
    listed = {name for split in manifest["splits"].values() for s in split["shards"] for name in s["files"]}
    on_disk = {p.name for p in out.iterdir() if p.is_file()}
    assert on_disk == listed | {"manifest.json"}  # no temporaries, no merged copies, no _progress
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"tokenizer"}
    assert manifest["dtype"] == "uint16"
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for name, meta in shard["files"].items():
                assert (out / name).stat().st_size == meta["bytes"]
                assert file_sha256(out / name) == meta["sha256"]
    assert [s["docs"] for s in manifest["splits"]["train"]["shards"]][:-1] == [100] * 9
    assert manifest["tokenizer"]["sha256"] == file_sha256(out / manifest["tokenizer"]["model"])
    assert verify_prepared(out) == manifest == json.loads((out / "manifest.json").read_text())


@pytest.mark.slow
def test_worker_processes_produce_the_same_bytes(
    prepared: BuildReport, owt_path: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    report = build_shards(str(owt_path), tmp_path / "owt", tokenizer_model, workers=2, docs_per_shard=100,
                          progress=False, command=prepared.manifest["command"])
    assert report.manifest == prepared.manifest
    for name in (n for split in report.manifest["splits"].values() for s in split["shards"] for n in s["files"]):
        assert (report.out_dir / name).read_bytes() == (prepared.out_dir / name).read_bytes()


def test_rerun_on_a_finished_directory_changes_nothing(prepared: BuildReport, owt_path: Path) -> None:
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.out_dir.rglob("*") if p.is_file()}
    report = build_shards(
        str(owt_path), prepared.out_dir, prepared.out_dir / "tokenizer" / "tokenizer.model",
        workers=0, docs_per_shard=100, progress=False,
    )
    assert report.already_complete and report.docs_processed == 0
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in prepared.out_dir.rglob("*") if p.is_file()}
    assert after == before


def test_other_settings_on_a_finished_directory_are_refused(prepared: BuildReport, owt_path: Path) -> None:
    with pytest.raises(DataError, match="prepared differently .*seed"):
        build_shards(str(owt_path), prepared.out_dir, prepared.out_dir / "tokenizer", seed=7,
                     docs_per_shard=100, progress=False)


def test_corrupted_shards_are_detected_and_repaired(
    prepared: BuildReport, owt_path: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared.out_dir, out)
    bin3, idx5 = out / "train-00003.bin", out / "train-00005.idx"
    with open(bin3, "r+b") as f:  # truncated
        f.truncate(bin3.stat().st_size - 2)
    with pytest.raises(DataError, match="train-00003.bin: .* bytes but the manifest records .*truncated"):
        verify_prepared(out, quick=True)
    shutil.copyfile(prepared.out_dir / bin3.name, bin3)
    idx1 = out / "valid-00000.idx"
    with open(idx1, "r+b") as f:  # a truncated index: refused by name, like a truncated .bin
        f.truncate(idx1.stat().st_size // 2)
    with pytest.raises(DataError, match=r"valid-00000\.idx: \d+ bytes but the manifest records"):
        verify_prepared(out, quick=True)
    shutil.copyfile(prepared.out_dir / idx1.name, idx1)
    data = bytearray(idx5.read_bytes())  # altered in place, same size
    data[-1] ^= 0xFF
    idx5.write_bytes(bytes(data))
    verify_prepared(out, quick=True)  # sizes alone cannot see it...
    with pytest.raises(DataError, match="train-00005.idx: sha256 .* differs from the manifest"):
        verify_prepared(out)  # ...the checksums do
    # The same command repairs: the damaged shard and those after it are rebuilt, identically.
    report = build_shards(str(owt_path), out, tokenizer_model, workers=0,
                          docs_per_shard=100, progress=False, command=prepared.manifest["command"])
    assert report.resumed_at_doc == prepared.manifest["splits"]["train"]["shards"][4]["end_doc"]
    assert verify_prepared(out) == prepared.manifest


def test_an_edited_manifest_is_refused_and_rebuilt(
    prepared: BuildReport, owt_path: Path, tokenizer_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(prepared.out_dir, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["valid"]["docs"] += 1  # still valid JSON, consistent with nothing
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: altered"):
        verify_prepared(out, quick=True)
    build_shards(str(owt_path), out, tokenizer_model, workers=0, docs_per_shard=100, progress=False,
                 command=prepared.manifest["command"])
    assert verify_prepared(out) == prepared.manifest


@pytest.mark.slow
def test_sigkill_then_resume_ends_like_a_clean_build(owt_path: Path, tokenizer_model: Path, tmp_path: Path) -> None:
    # Same command line (relative --out) in two directories, so the two manifests can be compared whole.
    command = [sys.executable, str(REPO / "data_prep" / "build_owt_shards.py"), "--input", str(owt_path),
               "--tokenizer", str(tokenizer_model), "--out", "prepared", "--workers", "2",
               "--docs-per-shard", "20", "--no-progress"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    killed.mkdir()
    # The clean build runs in this process (megatron-core already imported: saves a cold start) with
    # the command line the script would record; the interrupted and resumed ones are the real command.
    build_shards(str(owt_path), clean / "prepared", tokenizer_model, workers=2, docs_per_shard=20,
                 progress=False, command=command[1:])

    records = killed / "prepared" / "_progress" / "shards"
    proc = subprocess.Popen(command, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(records.glob("*.json"))) < 5:
        assert proc.poll() is None, "the build ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "prepared" / "manifest.json").exists()

    resumed = subprocess.run(command, cwd=killed, check=True, capture_output=True, text=True, timeout=300)
    assert "resumed at document" in resumed.stdout
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file())
    for path in files:
        assert (clean / path).read_bytes() == (killed / path).read_bytes(), path


def _jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_empty_docs_skipped_and_invalid_utf8_replaced_and_counted(tokenizer_model: Path, tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "in.jsonl", [
        b'{"text": "first document"}',
        b'{"text": "  \\n\\t "}',
        b'{"text": ""}',
        b'{"text": "broken \xff\xfe bytes"}',
        b'{"text": "a U+FFFD that was already there: \xef\xbf\xbd"}',
    ])
    report = build_shards(str(src), tmp_path / "out", tokenizer_model, workers=0, valid_fraction=0.0,
                          progress=False)
    manifest = report.manifest
    assert manifest["input"]["docs"] == 5
    assert manifest["input"]["skipped_empty"] == 2
    assert manifest["input"]["invalid_utf8_replaced"] == 1  # the genuine U+FFFD is not counted
    tok = load_tokenizer(report.out_dir)
    docs = ["first document", "", "", "broken \ufffd\ufffd bytes", "a U+FFFD that was already there: \ufffd"]
    found = shard_documents(report.out_dir, manifest, docs)
    assert sorted(found) == [0, 3, 4]
    assert [tok.decode(found[i][:-1]) for i in (0, 3, 4)] == [docs[0], docs[3], docs[4]]


def test_missing_text_field_names_field_and_file(tokenizer_model: Path, tmp_path: Path) -> None:
    good = _jsonl(tmp_path / "a.jsonl", [b'{"text": "fine"}'])
    bad = _jsonl(tmp_path / "b.jsonl", [b'{"body": "no text here"}'])
    with pytest.raises(DataError, match=r"b\.jsonl: records have no field 'text'.*--text-field"):
        build_shards([str(good), str(bad)], tmp_path / "out", tokenizer_model, workers=0, progress=False)
    partial = _jsonl(tmp_path / "c.jsonl", [b'{"text": "fine"}', b'{"text": null}'])
    with pytest.raises(DataError, match=r"c\.jsonl: record 1 \(0-based\): field 'text' is missing"):
        build_shards(str(partial), tmp_path / "out2", tokenizer_model, workers=0, progress=False)
    with pytest.raises(DataError, match=r"nothing\.jsonl: no such file"):
        build_shards(str(tmp_path / "nothing.jsonl"), tmp_path / "out3", tokenizer_model, progress=False)
    (tmp_path / "data.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"data\.csv: unsupported input type"):
        build_shards(str(tmp_path / "data.csv"), tmp_path / "out4", tokenizer_model, progress=False)


def test_text_field_option_txt_paragraphs_parquet_and_globs(tokenizer_model: Path, tmp_path: Path) -> None:
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from gzip"}) + "\n")
    pq.write_table(pa.table({"body": ["from parquet", "  "]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_bytes(b"para one\nline two\n\npara \xff two\n\n\n\npara three\n")
    corpus = CorpusSpec([str(tmp_path / "*.jsonl.gz"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")],
                        text_field="body")
    report = build_shards(corpus, tmp_path / "out", tokenizer_model, workers=0, valid_fraction=0.0, progress=False)
    inp = report.manifest["input"]
    assert [f["docs"] for f in inp["files"]] == [1, 2, 3]
    assert (inp["docs"], inp["skipped_empty"], inp["invalid_utf8_replaced"]) == (6, 1, 1)
    tok = load_tokenizer(report.out_dir)
    docs = ["from gzip", "from parquet", "", "para one\nline two", "para \ufffd two", "para three\n"]
    found = shard_documents(report.out_dir, report.manifest, docs)
    assert [tok.decode(found[i][:-1]) for i in sorted(found)] == [d for d in docs if d]


def test_reading_resumes_mid_corpus_skipping_whole_files(tmp_path: Path) -> None:
    sizes, files, docs = [3, 5, 2, 4], [], []
    for k, n in enumerate(sizes):
        texts = [f"file {k} document {j}" for j in range(n)]
        path = tmp_path / f"part-{k}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        files.append(str(path))
        docs += texts
    corpus = resolve_corpus(files)
    for start in (0, 3, 5, 9, 14):  # 5: inside part-1, with part-2 (2 documents) after it
        counts: dict[int, int] = {}
        batches = iter_documents(corpus, start=start, file_docs={0: 3, 1: 5, 2: 2}, on_file_done=counts.__setitem__)
        assert [d for batch in batches for d in batch] == docs[start:]
        assert counts == dict(enumerate(sizes))


def test_large_vocabularies_use_int32_ids(owt_path: Path, owt_docs: list[str], tmp_path: Path) -> None:
    from sdt_dist.data.tokenizer import train_tokenizer

    model = train_tokenizer(str(owt_path), tmp_path / "tok", vocab_size=70_000)
    report = build_shards(str(owt_path), tmp_path / "out", model, workers=0, valid_fraction=0.0, progress=False)
    assert report.manifest["dtype"] == "int32"
    tok = load_tokenizer(report.out_dir)
    found = shard_documents(report.out_dir, report.manifest, owt_docs)
    assert max(int(ids.max()) for ids in found.values()) >= 65536  # ids that uint16 could not hold
    assert all(found[i].tolist() == tok.encode(owt_docs[i]) + [tok.eod] for i in range(0, 1000, 37))


def test_shard_size_mb_closes_shards_by_size(owt_path: Path, tokenizer_model: Path, tmp_path: Path) -> None:
    limit_mb = 0.5
    report = build_shards(str(owt_path), tmp_path / "out", tokenizer_model, workers=0, shard_size_mb=limit_mb,
                          progress=False)
    sizes = [s["files"][s["name"] + ".bin"]["bytes"] for s in report.manifest["splits"]["train"]["shards"]]
    assert len(sizes) >= 4
    assert all(size >= limit_mb * 2**20 for size in sizes[:-1]) and sizes[-1] < limit_mb * 2**20 * 1.5


def test_prepare_corpus_trains_builds_and_then_returns_at_once(owt_path: Path, tmp_path: Path) -> None:
    out = prepare_corpus(str(owt_path), tmp_path / "p", vocab_size=1024, workers=0, progress=False)
    manifest = verify_prepared(out)
    assert manifest["tokenizer"]["vocab_size"] == 1024
    card = json.loads((out / "tokenizer" / "sdt_tokenizer.json").read_text())
    assert card["sha256"] == manifest["tokenizer"]["sha256"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_corpus(str(owt_path), out, vocab_size=1024, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="prepared with a 1024-piece tokenizer, not 2048"):
        prepare_corpus(str(owt_path), out, vocab_size=2048, progress=False)
