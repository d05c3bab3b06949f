"""Throughput of the shard-building pipeline against bare sentencepiece encoding on the same cores.

    python benchmarks/data_prep.py --repeat 20 --workers 1 2 --trials 3

The corpus is the input's documents repeated ``--repeat`` times (OpenWebText-1000 by default, so
20 x 4.7 MB), written as .jsonl.gz. For each worker count it times

* bare: ``SentencePieceProcessor.encode(docs, num_threads=N)`` over the documents already in memory;
* pipeline: ``build_shards(..., workers=N)``: reading and decompressing the file through ``datasets``,
  tokenizing in N processes, writing the shards, their checksums and the manifest. Measured in a
  warm process (datasets and megatron-core imported once beforehand); the cold command-line run,
  imports included, is timed once at the end.

tokens/s counts sentencepiece tokens (EOD excluded) for both, so the ratio is a ratio of wall times.
The CPU ratio (bare CPU seconds / pipeline CPU seconds, the pipeline's workers included) is the same
comparison in CPU time: on a machine shared with other load, where wall-clock rates and the 1 -> 2
scaling depend on what else runs, it is the steadier of the two.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SDT_SHARED_DATA", REPO.parent / "shared" / "data"))


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def total_cpu_seconds() -> float:
    """This process (all threads) and its reaped children (the pipeline's workers)."""
    return cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN)


def bare_encode(model: Path, docs: list[str], threads: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens)"""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tokens = 0
    started, cpu = time.perf_counter(), total_cpu_seconds()
    for i in range(0, len(docs), 1000):  # batches: the ids of all documents at once would not fit well
        tokens += sum(map(len, sp.encode(docs[i : i + 1000], num_threads=threads)))
    return time.perf_counter() - started, total_cpu_seconds() - cpu, tokens


def pipeline(corpus: Path, model: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds in all, CPU seconds of the main process)"""
    from sdt_dist.data.shards import build_shards

    shutil.rmtree(out, ignore_errors=True)
    started, cpu, main_cpu = time.perf_counter(), total_cpu_seconds(), cpu_seconds()
    build_shards(str(corpus), out, model, workers=workers, progress=False)
    result = time.perf_counter() - started, total_cpu_seconds() - cpu, cpu_seconds() - main_cpu
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED / "openwebtext-1000" / "openwebtext-1000.jsonl.gz"))
    parser.add_argument("--repeat", type=int, default=20, help="times the input's documents are repeated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=50000)
    parser.add_argument("--tokenizer", default=None, help="use this model instead of training one on the input")
    parser.add_argument("--trials", type=int, default=3, help="best of this many timings")
    args = parser.parse_args()
    # Imported here, not at the top: spawned workers re-import this script, as they would the command
    # line's, and should not pay for more than it does.
    sys.path.insert(0, str(REPO))
    from sdt_dist.data.shards import build_shards
    from sdt_dist.data.sources import iter_documents, resolve_corpus
    from sdt_dist.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="sdt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.tokenizer) if args.tokenizer else train_tokenizer(
            args.input, tmp / "tok", vocab_size=args.vocab_size
        )
        docs = [d for batch in iter_documents(resolve_corpus(args.input)) for d in batch if d.strip()]
        docs = docs * args.repeat
        corpus = tmp / "corpus.jsonl.gz"
        with gzip.open(corpus, "wt", encoding="utf-8", compresslevel=6) as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        text_mb = sum(len(d.encode("utf-8")) for d in docs) / 2**20
        vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()

        # Warm-up: one-time imports (datasets, megatron-core) stay out of the timed runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import megatron.core.datasets.indexed_dataset  # noqa: F401
        build_shards(args.input, tmp / "warm", model, workers=0, progress=False)

        load = os.getloadavg()[0]
        bare: dict[int, tuple[float, float, int]] = {}
        pipe: dict[int, tuple[float, float, float]] = {}
        for _ in range(args.trials):  # interleaved, so that a burst of other load spoils one trial, not one row
            for workers in args.workers:
                bare[workers] = min(bare.get(workers, (1e9,)), bare_encode(model, docs, workers))
                pipe[workers] = min(pipe.get(workers, (1e9,)), pipeline(corpus, model, tmp / "out", workers))
        tokens = bare[args.workers[0]][2]
        rows = [(w, tokens / bare[w][0], tokens / pipe[w][0], bare[w][1], pipe[w][1], pipe[w][2]) for w in args.workers]

        cli = [sys.executable, str(REPO / "data_prep" / "build_owt_shards.py"), "--input", str(corpus),
               "--tokenizer", str(model), "--out", str(tmp / "cli"), "--workers", str(max(args.workers)),
               "--no-progress"]
        started = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        cold = time.perf_counter() - started

    print(f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}, sentencepiece {spm.__version__}")
    print(f"corpus: {Path(args.input).name} x{args.repeat} = {len(docs):,} docs, {text_mb:.1f} MB of text, "
          f"{tokens:,} tokens (vocab {vocab})")
    print(f"load average before / after the runs: {load:.2f} / {os.getloadavg()[0]:.2f}; "
          f"best of {args.trials} interleaved runs each")
    print(f"{'workers':>7}  {'bare sentencepiece tok/s':>24}  {'pipeline tok/s':>14}  {'ratio':>5}  "
          f"{'CPU s: bare':>11}  {'pipeline':>8}  {'of which main process':>20}  {'CPU ratio':>9}")
    for workers, bare_rate, pipe_rate, bare_cpu, pipe_cpu, main_cpu in rows:
        print(f"{workers:>7}  {bare_rate:>24,.0f}  {pipe_rate:>14,.0f}  {pipe_rate / bare_rate:>5.2f}  "
              f"{bare_cpu:>11.1f}  {pipe_cpu:>8.1f}  {main_cpu:>20.1f}  {bare_cpu / pipe_cpu:>9.2f}")
    main_cpu, per_core = rows[-1][5], rows[0][1]
    print(f"main process (read, dispatch, write): {text_mb / main_cpu:,.0f} MB of text per CPU-second, "
          f"enough to feed ~{tokens / main_cpu / per_core:.0f} workers at this tokenizer's per-core speed")
    if len(rows) > 1:
        (w0, b0, p0, *_), (w1, b1, p1, *_) = rows[0], rows[-1]
        print(f"scaling {w0} -> {w1} workers: bare x{b1 / b0:.2f}, pipeline x{p1 / p0:.2f}")
    print(f"cold command line, {max(args.workers)} workers, imports and startup included: {cold:.1f}s "
          f"= {tokens / cold:,.0f} tok/s")


if __name__ == "__main__":
    main()
