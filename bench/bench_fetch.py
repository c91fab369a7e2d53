"""Download + scoring end to end from a local MLflow server: how long the job takes for a run.

    python bench/bench_fetch.py                                # 10,000 samples x 100 epochs
    python bench/bench_fetch.py --samples 10000 --epochs 100 --profile 20

Starts an `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in a temp dir, as the
tests do), logs one split's epoch tables to a run the way `LossRecorder` does, then times
`tracking.analyze.analyze_run` (list, parallel download in DOWNLOAD_THREADS threads,
check + score, log the scores back; no panels: the run has no images) and, apart,
the download alone and the scoring alone. With `--profile N`, cProfile's top entries of
N downloads done one after another on the main thread: where a file's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests.conftest import local_mlflow_server  # noqa: E402
from tracking import analyze, contract  # noqa: E402
from tracking.scoring.engines import score_split  # noqa: E402
from tracking.scoring.tables import epoch_files  # noqa: E402
from tracking.record.recorder import write_table  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402


def log_run(uri: str, folder: Path, samples: int, epochs: int) -> str:
    """A run with `epochs` tables of `samples` rows under per_sample_losses/train; returns its id."""
    tracker = MLflowTracker(uri)
    run_id = tracker.start(experiment="bench-fetch")
    rng = np.random.default_rng(0)
    ids = np.arange(samples, dtype=np.int64)
    folder.mkdir(parents=True)
    for epoch in range(epochs):
        path = folder / contract.epoch_file_name(epoch)
        write_table(pa.table({"sample_id": ids, "loss": rng.exponential(1.0, samples).astype(np.float32)}), path)
        tracker.log_artifact(path, contract.losses_dir("train"))
    tracker.finish()
    return run_id


def timed(label: str, files: int, action) -> object:
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    print(f"{label:<34}: {seconds:7.2f}s  {files / seconds:7.1f} files/s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--profile", type=int, default=20, help="downloads to profile one by one (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp, local_mlflow_server(Path(tmp)) as uri:
        start = time.perf_counter()
        run_id = log_run(uri, Path(tmp) / "tables", args.samples, args.epochs)
        size = sum(p.stat().st_size for p in (Path(tmp) / "tables").iterdir())
        print(f"logged {args.epochs} tables x {args.samples:,} samples ({size / 1e6:.1f} MB) in "
              f"{time.perf_counter() - start:.1f}s to {uri}")

        tracker = MLflowTracker(uri)
        result = timed(f"analyze_run end to end ({analyze.DOWNLOAD_THREADS} thr)", args.epochs,
                       lambda: analyze.analyze_run(tracker, run_id, panels=False))
        assert result.status == "done" and result.epochs == {"train": args.epochs}, result

        tracker.attach(run_id)
        paths = epoch_files(tracker.list_files(contract.LOSSES_DIR))["train"]
        local = timed("download only (parallel)", len(paths),
                      lambda: analyze.download_all(tracker, paths, Path(tmp) / "again"))
        timed("score only (local files)", len(paths),
              lambda: score_split("train", [(p, local[p]) for p in paths]))

        if args.profile:
            profiler = cProfile.Profile()
            chosen = paths[: args.profile]
            start = time.perf_counter()
            profiler.enable()
            for path in chosen:
                tracker.download(path, Path(tmp) / "profiled")
            profiler.disable()
            print(f"{len(chosen)} downloads one by one: {(time.perf_counter() - start) / len(chosen) * 1000:.1f} ms "
                  "per file; cProfile top entries (cumulative):")
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(18)
            print(out.getvalue()[out.getvalue().find("ncalls"):])


if __name__ == "__main__":
    main()
