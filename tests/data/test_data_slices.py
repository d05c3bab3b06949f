"""Slices, parts and merge: byte-range reading equals the datasets loaders, two half-input part builds
merged equal one build of the whole input, a part resumes only its unfinished work, format-1 directories
still load, and the Slurm array script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdt_dist.data import range_reader
from sdt_dist.data.assemble import merge_parts
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import manifest_checksum, read_manifest, verify_prepared
from sdt_dist.data.shards import BuildReport, build_shards
from sdt_dist.data.slices import plan_slices
from sdt_dist.data.sources import CorpusSpec, iter_documents, resolve_corpus
from sdt_dist.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
ARRAY_SCRIPT = REPO / "launchers" / "slurm" / "build_shards_array.sbatch"
COMMAND = ["sdt-build-shards", "(the same recorded command for both builds)"]
SLICE_MB = 0.25


@pytest.fixture(scope="module")
def two_files(owt_docs: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """An uncompressed JSON-lines file of 400 OpenWebText documents (2.2 MB: 8 or more slices of 0.25 MB) and a
    small text file read by paragraphs (one slice)."""
    root = tmp_path_factory.mktemp("two_files")
    jsonl = root / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in owt_docs[:400]), encoding="utf-8")
    txt = root / "b.txt"
    txt.write_text("\n\n".join(d for d in owt_docs[400:440]) + "\n", encoding="utf-8")
    return [str(jsonl), str(txt)]


@pytest.fixture(scope="module")
def whole(two_files: list[str], tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    return build_shards(two_files, tmp_path_factory.mktemp("whole") / "out", tokenizer_model, workers=0,
                        valid_fraction=0.1, docs_per_shard=25, slice_mb=SLICE_MB, progress=False, command=COMMAND)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _corpus(path: str, txt_unit: str) -> Any:
    return resolve_corpus(CorpusSpec(path, txt_unit=txt_unit))


def _datasets_docs(path: str, txt_unit: str) -> list[str]:
    return [d for batch in iter_documents(_corpus(path, txt_unit)) for d in batch]


def _range_docs(path: str, txt_unit: str, slice_bytes: int) -> tuple[list[str], int]:
    plan = plan_slices(_corpus(path, txt_unit), slice_bytes)
    docs = [d for s in plan for batch in range_reader.read_range(path, s.start, s.end, s.unit, "text")
            for d in batch]
    return docs, len(plan)


def test_byte_ranges_read_what_the_datasets_loaders_read(
    two_files: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs, slices = _range_docs(two_files[0], "paragraph", 100_000)
    assert slices >= 15 and docs == _datasets_docs(two_files[0], "paragraph")
    # Line breaks of every kind, runs of blank lines, invalid and multi-byte UTF-8, no final newline; read in
    # 5-byte blocks and cut every few bytes, so that blocks and slices end everywhere.
    text = (b"one\r\ntwo\rthree\n\n\nfour \xff\xfe five\n\n\n\n\xc3\xa9t\xc3\xa9\r\n\r\n\r\n"
            b"six\n \n\nseven \xe2\x82\xac\n\n\n\n\neight")
    path = tmp_path / "t.txt"
    path.write_bytes(text * 3)
    monkeypatch.setattr(range_reader, "_BLOCK", 5)
    for unit in ("line", "paragraph"):
        expected = _datasets_docs(str(path), unit)
        assert len(expected) > 10
        for slice_bytes in (1, 3, 7, 40):
            docs, slices = _range_docs(str(path), unit, slice_bytes)
            assert docs == expected, (unit, slice_bytes)
            assert slices > 1


def test_two_parts_merged_equal_one_build(
    whole: BuildReport, two_files: list[str], tokenizer_model: Path, owt_docs: list[str], tmp_path: Path
) -> None:
    inp = whole.manifest["input"]
    paragraphs = _datasets_docs(two_files[1], "paragraph")  # read by the datasets loader, independently
    assert len(inp["slices"]) >= 8 and [f["docs"] for f in inp["files"]] == [400, len(paragraphs)]
    parts = []
    for i in (1, 2):
        report = build_shards(two_files, tmp_path / f"part_{i}", tokenizer_model, workers=0, valid_fraction=0.1,
                              docs_per_shard=25, slice_mb=SLICE_MB, part=f"{i}/2", progress=False)
        assert len(report.manifest["slices"]) == len(inp["slices"]) * i // 2 - len(inp["slices"]) * (i - 1) // 2
        parts.append(report.out_dir)
    manifest = merge_parts(parts, tmp_path / "merged", COMMAND)
    assert manifest == whole.manifest == verify_prepared(tmp_path / "merged")
    assert _files(tmp_path / "merged") == _files(whole.out_dir)
    # ... and that build holds every document once, as sentencepiece encodes it, split about 10% / 90%.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(whole.out_dir)
    texts = owt_docs[:400] + paragraphs
    expected = sorted(tuple(ids + [tok.eod]) for ids in tok.encode_batch([t for t in texts if t.strip()]))
    found, valid = [], 0
    for split, info in whole.manifest["splits"].items():
        for shard in info["shards"]:
            dataset = IndexedDataset(str(whole.out_dir / shard["name"]))
            found += [tuple(np.array(dataset[k]).tolist()) for k in range(len(dataset))]
            valid += len(dataset) * (split == "valid")
    assert sorted(found) == expected
    assert 0.07 < valid / len(found) < 0.13


def test_a_part_resumes_only_its_unfinished_work(
    two_files: list[str], tokenizer_model: Path, tmp_path: Path
) -> None:
    kwargs: dict[str, Any] = dict(workers=0, valid_fraction=0.1, docs_per_shard=25, slice_mb=SLICE_MB,
                                  part="2/2", progress=False)
    first = build_shards(two_files, tmp_path / "p", tokenizer_model, **kwargs)
    before = _files(tmp_path / "p")
    again = build_shards(two_files, tmp_path / "p", tokenizer_model, **kwargs)
    assert again.already_complete and _files(tmp_path / "p") == before
    # An interruption inside the part's second slice: its summary not yet written, its last train shard half written.
    summary = first.manifest["slices"][1]  # the part's second slice
    progress = tmp_path / "p" / "_progress"
    (progress / "slices" / f"s{summary['slice']:06d}.json").unlink()
    (tmp_path / "p" / "part.json").unlink()
    last = [r for r in summary["shards"] if r["split"] == "train"][-1]
    (progress / "shards" / f"{last['name']}.json").unlink()
    (progress / "shards" / f"{last['name']}.bin").rename(progress / "shards" / f"{last['name']}.tmp.bin")
    resumed = build_shards(two_files, tmp_path / "p", tokenizer_model, **kwargs)
    # The slice resumes at its first document in no kept shard; the part's other slices are not read again.
    valid_end = max((r["end_doc"] for r in summary["shards"] if r["split"] == "valid"), default=0)
    start = min(last["first_doc"], valid_end)
    assert resumed.resumed_at_doc == first.manifest["slices"][0]["docs"] + start
    # tokenized: the documents after that point that no kept shard holds
    assert 0 < resumed.docs_processed <= summary["docs"] - start < summary["docs"]
    assert _files(tmp_path / "p") == before


def test_merge_refuses_an_incomplete_or_foreign_set_of_parts(
    two_files: list[str], tokenizer_model: Path, tmp_path: Path
) -> None:
    kwargs: dict[str, Any] = dict(workers=0, valid_fraction=0.1, docs_per_shard=25, slice_mb=4.0, progress=False)
    one = build_shards(two_files, tmp_path / "one", tokenizer_model, part="1/2", **kwargs).out_dir
    with pytest.raises(DataError, match=r"needs parts 1\.\.2 of 2 once each, got \[1\]"):
        merge_parts([one], tmp_path / "m", COMMAND)
    other = build_shards(two_files, tmp_path / "other", tokenizer_model, part="2/2", **{**kwargs, "seed": 7}).out_dir
    with pytest.raises(DataError, match=r"other: built from other input, settings or tokenizer"):
        merge_parts([one, other], tmp_path / "m", COMMAND)
    with pytest.raises(DataError, match=r"--slice '3/2': expected I/N"):
        build_shards(two_files, tmp_path / "x", tokenizer_model, part="3/2", **kwargs)


def test_format_1_directories_still_load_for_training(prepared: BuildReport, tmp_path: Path) -> None:
    from sdt_dist.data.loader import build_datasets

    old = tmp_path / "old"
    shutil.copytree(prepared.out_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    # what format 1 wrote: no slices, no slice_mb, shards without their slice
    manifest["format"] = "sdt-dist-shards/1"
    del manifest["input"]["slices"], manifest["settings"]["slice_mb"]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["slice"], shard["slice_shard"]
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(old)["format"] == "sdt-dist-shards/1"
    train, valid = build_datasets([old], None, seq_length=32, seed=1, num_train_samples=64, num_valid_samples=8,
                                  cache_dir=tmp_path / "cache")
    assert len(train) >= 64 and train[0]["tokens"].shape == (32,) and valid is not None
    with pytest.raises(DataError, match="prepared by an earlier version"):
        build_shards(str(prepared.manifest["input"]["files"][0]["path"]), old, old / "tokenizer", workers=0,
                     docs_per_shard=100, progress=False)


@pytest.mark.slow
def test_worker_processes_build_slices_to_the_same_bytes(
    whole: BuildReport, two_files: list[str], tokenizer_model: Path, tmp_path: Path
) -> None:
    report = build_shards(two_files, tmp_path / "w2", tokenizer_model, workers=2, valid_fraction=0.1,
                          docs_per_shard=25, slice_mb=SLICE_MB, progress=False, command=COMMAND)
    assert report.manifest == whole.manifest
    assert _files(report.out_dir) == _files(whole.out_dir)


def test_slurm_array_script() -> None:
    text = ARRAY_SCRIPT.read_text()
    assert os.access(ARRAY_SCRIPT, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert text.rindex("#SBATCH") < text.index("set -e")  # sbatch reads directives only before the first command
    assert "--slice \"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT\"" in text and "--merge" in text
    subprocess.run(["bash", "-n", str(ARRAY_SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-x", str(ARRAY_SCRIPT)], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_merge_command_line(
    whole: BuildReport, two_files: list[str], tokenizer_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.syspath_prepend(str(REPO / "data_prep"))  # the scripts import their _cli module as a sibling
    from build_owt_shards import main

    common = ["--input", *two_files, "--tokenizer", str(tokenizer_model), "--workers", "0", "--docs-per-shard", "25",
              "--valid-fraction", "0.1", "--slice-mb", str(SLICE_MB), "--no-progress"]
    for i in (1, 2):
        assert main([*common, "--slice", f"{i}/2", "--out", str(tmp_path / f"part_{i}")]) == 0
    capsys.readouterr()
    assert main(["--merge", str(tmp_path / "part_1"), str(tmp_path / "part_2"), "--out", str(tmp_path / "final")]) == 0
    assert f"{whole.manifest['input']['docs']:,} documents from 2 parts" in capsys.readouterr().out
    manifest = verify_prepared(tmp_path / "final")
    assert {k: v for k, v in manifest.items() if k not in ("command", "manifest_sha256")} == \
        {k: v for k, v in whole.manifest.items() if k not in ("command", "manifest_sha256")}
    assert main(["--merge", str(tmp_path / "part_1"), "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_indexed_writer_writes_what_megatron_core_writes(dtype: type[np.integer], tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from sdt_dist.data.indexed_writer import IndexedWriter

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n).astype(dtype) for n in (1, 7, 300, 2)]
    ours, theirs = IndexedWriter(str(tmp_path / "a.bin"), dtype), IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype)
    for doc in docs:
        ours.add_document(doc)
        theirs.add_document(doc, [len(doc)])
    ours.finalize(str(tmp_path / "a.idx"))
    theirs.finalize(str(tmp_path / "b.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
