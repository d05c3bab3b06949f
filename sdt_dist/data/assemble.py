"""From finished slices to one prepared directory: global shard names and document numbers in input order,
and the manifest. The same step ends a one-machine build and merges the parts of a multi-node one; it links
(or, across file systems, copies) the slices' files, it never reads them."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from sdt_dist.atomic import write_json_atomic
from sdt_dist.data.errors import DataError
from sdt_dist.data.manifest import MANIFEST_FORMAT, MANIFEST_NAME, manifest_checksum
from sdt_dist.data.slice_build import SPLITS, summary_path

PART_NAME = "part.json"
PART_FORMAT = "sdt-dist-shards-part/1"
_FINAL_SHARD = re.compile(r"^(train|valid)-\d{5}\.(bin|idx)$")


def _place(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another file system (a part on node-local disk), or no hard links there
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def assemble(out: Path, sources: list[tuple[Path, dict[str, Any]]], head: dict[str, Any]) -> dict[str, Any]:
    """Give the shards of every slice (``(its shards directory, its summary)``, in plan order) their final
    names in ``out`` and write the manifest, whose other fields are ``head``'s; returns the manifest."""
    for path in out.iterdir():  # left by an interrupted assembly: every final file is placed again
        if _FINAL_SHARD.match(path.name):
            path.unlink()
    shards: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    tails = {split: {"skipped_empty": 0, "invalid_utf8_replaced": 0} for split in SPLITS}
    slices, file_docs = [], [0] * len(head["input"]["files"])
    offset = 0
    for k, (shards_dir, summary) in enumerate(sources):
        if summary["slice"] != k:
            raise DataError(f"{shards_dir}: holds slice {summary['slice']} where slice {k} was expected")
        for record in summary["shards"]:
            split = record["split"]
            name = f"{split}-{len(shards[split]):05d}"
            files = {}
            for local, meta in sorted(record["files"].items()):
                src, final = shards_dir / local, f"{name}.{local.rsplit('.', 1)[1]}"
                if not src.is_file() or src.stat().st_size != meta["bytes"]:
                    raise DataError(f"{src}: missing or resized since its slice was built; rebuild that slice")
                _place(src, out / final)
                files[final] = meta
            shards[split].append({
                **record, "name": name, "index": len(shards[split]), "files": files, "slice": k,
                "slice_shard": record["index"], "first_doc": record["first_doc"] + offset,
                "end_doc": record["end_doc"] + offset,
            })
        for split in SPLITS:
            for key in tails[split]:
                tails[split][key] += summary["tail"][split][key]
        slices.append({key: summary[key] for key in ("file", "start", "end", "unit", "docs", "tail")})
        file_docs[summary["file"]] += summary["docs"]
        offset += summary["docs"]
    splits = {}
    for split in SPLITS:
        recs = shards[split]
        splits[split] = {
            "docs": sum(r["docs"] for r in recs),
            "tokens": sum(r["tokens"] for r in recs),
            "skipped_empty": sum(r["skipped_empty"] for r in recs) + tails[split]["skipped_empty"],
            "invalid_utf8_replaced": sum(r["invalid_utf8_replaced"] for r in recs)
            + tails[split]["invalid_utf8_replaced"],
            "shards": recs,
        }
    manifest = {
        **head,
        "format": MANIFEST_FORMAT,
        "input": {
            "files": [{**f, "docs": n} for f, n in zip(head["input"]["files"], file_docs, strict=True)],
            "slices": slices,
            "docs": offset,
            "skipped_empty": sum(s["skipped_empty"] for s in splits.values()),
            "invalid_utf8_replaced": sum(s["invalid_utf8_replaced"] for s in splits.values()),
        },
        "splits": splits,
    }
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    write_json_atomic(out / MANIFEST_NAME, manifest, sort_keys=True)
    return manifest


def restore_progress(out: Path, manifest: dict[str, Any], progress_dir: Path) -> None:
    """Turn a finished (format 2) directory back into a build in progress, its shards recorded under their
    slice's names, so that a rerun keeps those that still verify and rebuilds the rest."""
    shards_dir = progress_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    offsets, offset = [], 0
    for s in manifest["input"]["slices"]:
        offsets.append(offset)
        offset += s["docs"]
    for split in manifest["splits"].values():
        for record in split["shards"]:
            k, local = record["slice"], f"s{record['slice']:06d}-{record['split']}-{record['slice_shard']:05d}"
            files = {}
            for name, meta in record["files"].items():
                ext = name.rsplit(".", 1)[1]
                if (out / name).is_file():
                    _place(out / name, shards_dir / f"{local}.{ext}")
                files[f"{local}.{ext}"] = meta
            kept = {key: v for key, v in record.items() if key not in ("slice", "slice_shard")}
            write_json_atomic(shards_dir / f"{local}.json", {
                **kept, "name": local, "index": record["slice_shard"], "files": files,
                "first_doc": record["first_doc"] - offsets[k], "end_doc": record["end_doc"] - offsets[k],
            }, sort_keys=True)


def part_sources(progress_dir: Path, indices: list[int]) -> list[tuple[Path, dict[str, Any]]]:
    return [(progress_dir / "shards", json.loads(summary_path(progress_dir, k).read_text(encoding="utf-8")))
            for k in indices]


def merge_parts(parts: list[Path], out: Path, command: list[str]) -> dict[str, Any]:
    """One prepared directory ``out`` from the part directories of ``--slice I/N`` builds (all N of them)."""
    if not parts:
        raise DataError("--merge needs the part directories")
    infos = []
    for part in parts:
        path = part / PART_NAME
        if not path.is_file():
            raise DataError(f"{path}: missing; {part} is not a finished part (rerun its --slice build)")
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format") != PART_FORMAT:
            raise DataError(f"{path}: unknown part format {info.get('format')!r} (expected {PART_FORMAT!r})")
        infos.append(info)
    first = infos[0]
    for part, info in zip(parts[1:], infos[1:]):
        for key in ("plan", "head"):
            if info[key] != first[key]:
                raise DataError(f"{part}: built from other input, settings or tokenizer than {parts[0]} ({key})")
    n = first["part"][1]
    numbers = sorted(info["part"][0] for info in infos)
    if numbers != list(range(1, n + 1)) or any(info["part"][1] != n for info in infos):
        raise DataError(f"--merge needs parts 1..{n} of {n} once each, got {numbers}")
    by_slice: dict[int, tuple[Path, dict[str, Any]]] = {}
    for part, info in zip(parts, infos):
        for summary in info["slices"]:
            by_slice[summary["slice"]] = (part / "_progress" / "shards", summary)
    if sorted(by_slice) != list(range(len(first["plan"]))):
        raise DataError(f"the parts hold slices {sorted(by_slice)}, not the plan's 0..{len(first['plan']) - 1}")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    tok_dir = out / first["head"]["tokenizer"]["model"]
    tok_dir.parent.mkdir(parents=True, exist_ok=True)
    for src in (parts[0] / first["head"]["tokenizer"]["model"]).parent.iterdir():
        _place(src, tok_dir.parent / src.name)
    return assemble(out, [by_slice[k] for k in range(len(by_slice))], {**first["head"], "command": command})
