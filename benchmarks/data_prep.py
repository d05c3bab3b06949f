"""Throughput of the shard-building pipeline against bare sentencepiece encoding on the same cores, and
how little of it the main process does.

    python benchmarks/data_prep.py --repeat 6 --workers 1 2 --trials 2

The corpus is the input's documents repeated ``--repeat`` times (OpenWebText-1000 by default, so
6 x 4.7 MB of text), written as one uncompressed .jsonl file, which the build cuts into slices of
``--slice-mb`` MB (default: 1/8 of the file, so that 2 workers get 4 slices each). For each worker count
it times

* bare: ``SentencePieceProcessor.encode(docs, num_threads=N)`` over the documents already in memory;
* pipeline: ``build_shards(..., workers=N)``: N worker processes each reading its slices of the file,
  tokenizing them and writing their shards and checksums; the main process plans the slices, waits, and
  writes the manifest. Measured in a warm process (megatron-core imported once beforehand); the cold
  command-line run, imports included, is timed once at the end.

tokens/s counts sentencepiece tokens (EOD excluded) for both, so the ratio is a ratio of wall times.
The CPU ratio (bare CPU seconds / pipeline CPU seconds, the pipeline's workers included) is the same
comparison in CPU time: on a machine shared with other load, where wall-clock rates and the 1 -> 2
scaling depend on what else runs, it is the steadier of the two. CPU per MB of input: the main process's
(its own rusage) against the workers' (rusage of the reaped children), per MB of the .jsonl file.
"""

from __future__ import annotations

import argparse
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


def pipeline(corpus: Path, model: Path, out: Path, workers: int, slice_mb: float) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds in all, CPU seconds of the main process)"""
    from sdt_dist.data.shards import build_shards

    shutil.rmtree(out, ignore_errors=True)
    started, cpu, main_cpu = time.perf_counter(), total_cpu_seconds(), cpu_seconds()
    build_shards(str(corpus), out, model, workers=workers, slice_mb=slice_mb, progress=False)
    result = time.perf_counter() - started, total_cpu_seconds() - cpu, cpu_seconds() - main_cpu
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED / "openwebtext-1000" / "openwebtext-1000.jsonl.gz"))
    parser.add_argument("--repeat", type=int, default=6, help="times the input's documents are repeated")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=50000)
    parser.add_argument("--tokenizer", default=None, help="use this model instead of training one on the input")
    parser.add_argument("--trials", type=int, default=2, help="best of this many timings")
    parser.add_argument("--slice-mb", type=float, default=None, help="slice size (default: 1/8 of the corpus file)")
    args = parser.parse_args()
    # Imported here, not at the top: spawned workers re-import this script, as they would the command
    # line's, and should not pay for more than it does.
    sys.path.insert(0, str(REPO))
    from sdt_dist.data.shards import build_shards
    from sdt_dist.data.slices import plan_slices
    from sdt_dist.data.sources import iter_documents, resolve_corpus
    from sdt_dist.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory(prefix="sdt-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = Path(args.tokenizer) if args.tokenizer else train_tokenizer(
            args.input, tmp / "tok", vocab_size=args.vocab_size
        )
        docs = [d for batch in iter_documents(resolve_corpus(args.input)) for d in batch if d.strip()]
        docs = docs * args.repeat
        corpus = tmp / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        text_mb = sum(len(d.encode("utf-8")) for d in docs) / 2**20
        input_mb = corpus.stat().st_size / 2**20
        slice_mb = args.slice_mb or input_mb / 8
        slices = len(plan_slices(resolve_corpus(str(corpus)), int(slice_mb * 2**20)))
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
                pipe[workers] = min(pipe.get(workers, (1e9,)), pipeline(corpus, model, tmp / "out", workers, slice_mb))
        tokens = bare[args.workers[0]][2]
        rows = [(w, tokens / bare[w][0], tokens / pipe[w][0], bare[w][1], pipe[w][1], pipe[w][2]) for w in args.workers]

        cli = [sys.executable, str(REPO / "data_prep" / "build_owt_shards.py"), "--input", str(corpus),
               "--tokenizer", str(model), "--out", str(tmp / "cli"), "--workers", str(max(args.workers)),
               "--slice-mb", str(slice_mb), "--no-progress"]
        started = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        cold = time.perf_counter() - started

    print(f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
          f"Python {platform.python_version()}, sentencepiece {spm.__version__}")
    print(f"corpus: {Path(args.input).name} x{args.repeat} = {len(docs):,} docs, {text_mb:.1f} MB of text, "
          f"{tokens:,} tokens (vocab {vocab}); one .jsonl of {input_mb:.1f} MB in {slices} slices of "
          f"{slice_mb:.2f} MB")
    print(f"load average before / after the runs: {load:.2f} / {os.getloadavg()[0]:.2f}; "
          f"best of {args.trials} interleaved runs each")
    print(f"{'workers':>7}  {'bare sentencepiece tok/s':>24}  {'pipeline tok/s':>14}  {'ratio':>5}  "
          f"{'CPU s: bare':>11}  {'pipeline':>8}  {'of which main process':>20}  {'CPU ratio':>9}")
    for workers, bare_rate, pipe_rate, bare_cpu, pipe_cpu, main_cpu in rows:
        print(f"{workers:>7}  {bare_rate:>24,.0f}  {pipe_rate:>14,.0f}  {pipe_rate / bare_rate:>5.2f}  "
              f"{bare_cpu:>11.1f}  {pipe_cpu:>8.1f}  {main_cpu:>20.1f}  {bare_cpu / pipe_cpu:>9.2f}")
    for workers, *_, pipe_cpu, main_cpu in rows:
        worker_cpu = pipe_cpu - main_cpu
        print(f"{workers} worker(s): main process (plan, wait, manifest) {1000 * main_cpu / input_mb:.2f} CPU-ms per "
              f"MB of input, workers {1000 * worker_cpu / input_mb:.0f} CPU-ms per MB: main / worker = 1/"
              f"{worker_cpu / max(main_cpu, 1e-9):.0f} (goal: at most 1/64)")
    if len(rows) > 1:
        (w0, b0, p0, *_), (w1, b1, p1, *_) = rows[0], rows[-1]
        print(f"scaling {w0} -> {w1} workers: bare x{b1 / b0:.2f}, pipeline x{p1 / p0:.2f}")
    print(f"cold command line, {max(args.workers)} workers, imports and startup included: {cold:.1f}s "
          f"= {tokens / cold:,.0f} tok/s")


if __name__ == "__main__":
    main()
