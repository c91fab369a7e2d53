"""Scoring speed and memory against just reading the tables, and against pandas concat + groupby.

    python bench/bench_scoring.py --samples 1000000 --epochs 100    # the issue's size (~350 MB of tmp disk)
    python bench/bench_scoring.py --samples 1000000 --epochs 100 --dynamics  # + the classification columns
    python bench/bench_scoring.py --samples 100000 --epochs 20      # quick

Writes synthetic per-epoch tables exactly as `LossRecorder` does (zstd parquet, sorted
ids; `--dynamics` adds target, correct, p_true, margin and el2n, so that every score is
computed), then times in one run:
(a) reading every table with pyarrow, with `pq.read_table` and with the leaner
    `pq.ParquetFile(path).read()`; ratios are taken against the faster of the two;
(b) the job's scoring (`score_split`: read + check + sum, one epoch at a time);
(c) the DuckDB engine (`tracking.scoring.duckdb_engine`: one query over all the files);
(d) the naive way: pandas concat of all epochs then groupby-sum, on a subset of epochs
    (extrapolated linearly) when the full concat would not fit.
Each way runs `--repeats` times in a fresh process; the fastest run counts. Peak memory is
above what the imports take (ru_maxrss); the job and DuckDB also score a fifth of the
epochs, to show that their peak follows the number of samples, not samples x epochs.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_tables(folder: Path, samples: int, epochs: int, dynamics: bool = False) -> list[Path]:
    """One parquet file per epoch, written by the recorder's own writer."""
    from tracking.record.recorder import write_table

    rng = np.random.default_rng(0)
    ids = np.arange(samples, dtype=np.int64)
    target = rng.integers(0, 10, samples).astype(np.int64)
    paths = []
    for epoch in range(epochs):
        path = folder / f"epoch_{epoch:04d}.parquet"
        loss = rng.exponential(1.0, samples).astype(np.float32)
        columns = {"sample_id": ids, "loss": loss}
        if dynamics:
            p_true = np.exp(-loss)
            columns |= {"target": target, "correct": p_true > 0.5, "p_true": p_true,
                        "margin": rng.normal(0, 2, samples).astype(np.float32),
                        "el2n": rng.uniform(0, 1.4, samples).astype(np.float32)}
        write_table(pa.table(columns), path)
        paths.append(path)
    return paths


def _child(mode: str, folder: str, epochs: int) -> None:
    """Runs in a fresh process so that its peak RSS is its own."""
    import pandas as pd

    from tracking.scoring.engines import score_split
    if mode == "duckdb":
        import duckdb  # noqa: F401 - imported before the baseline, like the other ways' libraries

    paths = sorted(Path(folder).glob("epoch_*.parquet"))[:epochs]
    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports
    start = time.perf_counter()
    if mode == "read":
        for path in paths:
            pq.read_table(path)
    elif mode == "read-file":
        for path in paths:
            with pq.ParquetFile(path) as parquet:
                parquet.read()
    elif mode == "score":
        score_split("bench", [(p.name, p) for p in paths])
    elif mode == "duckdb":
        from tracking.scoring.duckdb_engine import score_tables_duckdb

        score_tables_duckdb(paths, "bench")
    elif mode == "pandas":
        frames = [pd.read_parquet(p) for p in paths]
        pd.concat(frames).groupby("sample_id")["loss"].sum()
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{seconds} {peak_mb - baseline_mb}")


def measure(mode: str, folder: Path, epochs: int, repeats: int = 1) -> tuple[float, float]:
    """Fastest time and largest peak of `repeats` fresh processes (the fastest is the least disturbed
    by other work on a shared machine)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), str(epochs)],
                             capture_output=True, text=True, check=True).stdout.split()
        runs.append((float(out[-2]), float(out[-1])))
    return min(seconds for seconds, _ in runs), max(peak for _, peak in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--pandas-epochs", type=int, default=20, help="epochs for the naive way (extrapolated)")
    parser.add_argument("--dynamics", action="store_true", help="tables with the classification columns too")
    parser.add_argument("--repeats", type=int, default=3, help="runs per way (reads, job, DuckDB); the fastest counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], int(args.child[2]))
        return
    with tempfile.TemporaryDirectory(prefix="bench-scoring-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths = write_tables(folder, args.samples, args.epochs, args.dynamics)
        size = sum(p.stat().st_size for p in paths)
        print(f"wrote {args.epochs} tables x {args.samples:,} samples in {time.perf_counter() - start:.1f}s: "
              f"{size / (args.samples * args.epochs):.2f} bytes per sample per epoch")
        read_table_s, read_table_mb = measure("read", folder, args.epochs, args.repeats)
        read_file_s, read_file_mb = measure("read-file", folder, args.epochs, args.repeats)
        read_s = min(read_table_s, read_file_s)
        score_s, score_mb = measure("score", folder, args.epochs, args.repeats)
        duck_s, duck_mb = measure("duckdb", folder, args.epochs, args.repeats)
        fifth = max(1, args.epochs // 5)
        _, score_fifth_mb = measure("score", folder, fifth)
        _, duck_fifth_mb = measure("duckdb", folder, fifth)
        pandas_epochs = min(args.pandas_epochs, args.epochs)
        pandas_s, pandas_mb = measure("pandas", folder, pandas_epochs)
        pandas_full = pandas_s * args.epochs / pandas_epochs
        print(f"pq.read_table     : {read_table_s:8.2f}s  +{read_table_mb:6.0f} MB peak")
        print(f"ParquetFile.read  : {read_file_s:8.2f}s  +{read_file_mb:6.0f} MB peak   (reading = the faster: {read_s:.2f}s)")
        print(f"score (the job)   : {score_s:8.2f}s  +{score_mb:6.0f} MB peak   = {score_s / read_s:.2f}x reading"
              f"; +{score_fifth_mb:.0f} MB peak at {fifth} epochs")
        print(f"score (DuckDB)    : {duck_s:8.2f}s  +{duck_mb:6.0f} MB peak   = {duck_s / read_s:.2f}x reading"
              f"; +{duck_fifth_mb:.0f} MB peak at {fifth} epochs")
        print(f"pandas concat+sum : {pandas_full:8.2f}s  +{pandas_mb:6.0f} MB peak at {pandas_epochs} epochs"
              f"{' (time extrapolated)' if pandas_epochs < args.epochs else ''}"
              f"   = {pandas_full / score_s:.1f}x slower than the job")
        print(f"for scale         : all ids + losses would take {args.samples * args.epochs * 12 / 2**20:.0f} MB in "
              f"memory; the sums take {args.samples * 16 / 2**20:.0f} MB (id + float64 per sample)")


if __name__ == "__main__":
    main()
