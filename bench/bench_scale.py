"""How the cost of scoring grows with N samples x E epochs, for each engine, on sharded epochs.

    python bench/bench_scale.py                                   # 1M, 3M, 10M samples x 10 epochs, 8 parts
    python bench/bench_scale.py --samples 1e6,1e7,1e8 --engines arrow,duckdb

Synthetic split tables, each epoch sharded into `--parts` parts the way torchrun ranks write them
(rank r holds the ids r, r + parts, ...; each part sorted), with every column the dynamics scores read.
Each (engine, N) is scored in a fresh process, timed from its start to `scores.parquet` written, its peak
RSS sampled every 50 ms over the process and its children (Spark's JVM included). The tracker's download
and write-back are not part of it (`bench/bench_job.py` measures the whole job on small runs).

Writes to `--out`: scale.csv, scale.md (the table, the per-core rates, the largest N that fits in 16 GB
by a linear fit of RSS, and a paper extrapolation to 1B and 10B samples on a cluster) and scale.png.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracking import contract  # noqa: E402

CLUSTER_NODES, CLUSTER_CORES = 8, 32  # the paper extrapolation's cluster: 8 nodes of 32 cores
MEMORY_LIMIT = 16 * 2**30


def write_split(folder: Path, samples: int, epochs: int, parts: int, seed: int = 0) -> int:
    """Sharded epoch tables of one split under `folder` (the contract's layout); returns their bytes."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(samples, dtype=np.float32)  # a sample's own hardness, steady over epochs
    target = rng.integers(0, 10, samples)
    size = 0
    for epoch in range(epochs):
        epoch_dir = folder / contract.epoch_parts_dir("train", epoch)
        epoch_dir.mkdir(parents=True, exist_ok=True)
        p_true = np.clip(1 - difficulty + rng.normal(0, 0.1, samples).astype(np.float32) - 0.5 / (epoch + 1), 0.001, 1)
        columns = {"loss": -np.log(p_true), "p_true": p_true, "correct": p_true > 0.5,
                   "margin": (p_true - 0.5) * 4, "el2n": (1 - p_true) * 1.2}
        for part in range(parts):
            ids = np.arange(part, samples, parts)
            table = pa.table({contract.SAMPLE_ID: ids, **{name: values[ids] for name, values in columns.items()},
                              contract.TARGET: target[ids]})
            path = epoch_dir / contract.part_file_name(part)
            pq.write_table(table, path)
            size += path.stat().st_size
    return size


def worker(engine: str, folder: Path, out: Path, master: str) -> None:
    """Score the split under `folder` with `engine`, write scores.parquet to `out` (the measured process)."""
    from tracking.scoring.engines import ENGINES
    from tracking.scoring.tables import epoch_files

    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*.parquet"))
    epochs = epoch_files(files)["train"]
    tables = [(path if isinstance(path, str) else contract.epoch_parts_dir("train", e),
               folder / path if isinstance(path, str) else [(part, folder / part) for part in path])
              for e, path in enumerate(epochs)]
    if engine == "spark":
        from tracking.scoring.spark_engine import spark_session

        spark_session(master)
    scores = ENGINES[engine].score("train", tables, None, None, False)
    if engine == "spark":  # the scores stay in Spark, which writes them (`SparkScores.write`)
        scores.write(out.with_suffix(""))
    else:
        scores.to_parquet(out, index=False)


def measured(engine: str, folder: Path, master: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes of the process tree) of one scoring in a fresh process."""
    import psutil

    out = folder.parent / f"scores-{engine}.parquet"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--worker", engine, str(folder), str(out), master],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{engine} failed on {folder} (exit {process.returncode})")
    written = out.with_suffix("") if engine == "spark" else out  # Spark writes its folder (`SparkScores.write`)
    shutil.rmtree(written) if written.is_dir() else written.unlink()
    return seconds, peak


def plot(table: pd.DataFrame, path: Path) -> None:
    from tracking.report.plots import agg_figure

    figure = agg_figure(10, 4.2)
    for index, (column, label) in enumerate((("seconds", "wall time (s)"), ("peak_rss_gb", "peak RSS (GB)")), 1):
        axes = figure.add_subplot(1, 2, index)
        for engine, rows in table.groupby("engine"):
            axes.plot(rows["rows"], rows[column], marker="o", label=engine)
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("rows scored (N samples x E epochs)")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.suptitle("scoring one split, sharded epochs (8 parts), fresh process each, 2 CPU cores")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(table: pd.DataFrame, command: str, cores: int) -> str:
    lines = ["# Scoring at scale: time and memory against N x E", "", f"    {command}", "",
             f"On this machine ({cores} CPU cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} "
             "GiB): each (engine, N) scored in a fresh process, start to scores.parquet written; peak RSS of the "
             "process tree (Spark's JVM included). arrow and spark compute every registered score; duckdb the loss "
             "sums only (action, mean_loss).", "",
             "| engine | samples | epochs | rows | seconds | peak RSS (GB) | rows/s/core |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in table.itertuples():
        lines.append(f"| {row.engine} | {row.samples:,} | {row.epochs} | {row.rows:,} | {row.seconds:.1f} | "
                     f"{row.peak_rss_gb:.2f} | {row.rows / row.seconds / cores:,.0f} |")
    lines += ["", "## The largest N that fits in 16 GB, and 1B / 10B samples on paper", "",
              "A linear fit of peak RSS against N (per engine, over the sizes above), and the rate of the largest "
              f"size per core scaled to {CLUSTER_NODES} nodes x {CLUSTER_CORES} cores. The scaling is an assumption, "
              "not a measurement: linear in cores for arrow and duckdb only if the split is cut by sample id across "
              "independent processes (they are single-machine engines), and for Spark as its aggregations over "
              "partitions scale, less its shuffle of every row by sample_id.", "",
              "| engine | bytes/sample (fit) | largest N in 16 GB | 1B x 10 on the cluster | 10B x 10 on the cluster |",
              "| --- | --- | --- | --- | --- |"]
    for engine, rows in table.groupby("engine"):
        slope, intercept = np.polyfit(rows["samples"], rows["peak_rss_gb"] * 2**30, 1) if len(rows) > 1 else (
            rows["peak_rss_gb"].iloc[0] * 2**30 / rows["samples"].iloc[0], 0.0)
        largest = (MEMORY_LIMIT - intercept) / slope if slope > 0 else float("inf")
        rate = (rows["rows"] / rows["seconds"]).iloc[-1] / cores  # rows/s/core at the largest size
        cluster = rate * CLUSTER_NODES * CLUSTER_CORES
        lines.append(f"| {engine} | {slope:,.0f} | {largest:,.0f} | {1e10 / cluster / 60:,.1f} min | "
                     f"{1e11 / cluster / 60:,.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1e6,3e6,1e7")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--parts", type=int, default=8)
    parser.add_argument("--engines", default="arrow,duckdb,spark")
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--spark-samples", default="1e6,3e6", help="the sizes Spark scores (it is the slowest here)")
    parser.add_argument("--out", default="bench/results/scale")
    parser.add_argument("--worker", nargs=4, metavar=("ENGINE", "FOLDER", "OUT", "MASTER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, folder, out, master = args.worker
        worker(engine, Path(folder), Path(out), master)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    spark_sizes = {int(float(n)) for n in args.spark_samples.split(",")}
    rows = []
    for samples in (int(float(n)) for n in args.samples.split(",")):
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
            folder = Path(work) / "run"
            size = write_split(folder, samples, args.epochs, args.parts)
            for engine in tqdm(engines, desc=f"{samples:,} x {args.epochs}", unit="engine"):
                if engine == "spark" and samples not in spark_sizes:
                    continue
                seconds, peak = measured(engine, folder, args.spark_master)
                rows.append({"engine": engine, "samples": samples, "epochs": args.epochs,
                             "rows": samples * args.epochs, "parts": args.parts, "table_bytes": size,
                             "seconds": seconds, "peak_rss_gb": peak / 2**30})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "scale.csv", index=False)
    plot(table, out / "scale.png")
    command = "python bench/bench_scale.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = markdown(table, command.strip(), os.cpu_count() or 1)
    (out / "scale.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
