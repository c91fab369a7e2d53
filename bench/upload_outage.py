"""How long `end_epoch` holds the training loop, with the tracking server up and with it gone.

    python bench/upload_outage.py [--samples 100000] [--epochs 5]

Starts a local `mlflow server`, records `--epochs` epochs of `--samples` per-sample losses
with it up, then stops it and records as many again; prints the median `end_epoch` time of
each phase (and without a tracker, the baseline) and the down/up ratio, then restarts the server and prints how long the queue took
to drain (`finish`). The loop never waits for the network, so the two medians should match.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracking.record.recorder import LossRecorder  # noqa: E402
from tracking.backends import MLflowTracker  # noqa: E402


def _server(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art"),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="upload-outage-"))
    os.environ.update(ACTION_SCORES_SPOOL=str(root / "spool"), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                      ACTION_SCORES_UPLOAD_BACKOFF="1", MLFLOW_DISABLE_TELEMETRY="true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = _server(root, port)
    tracker = MLflowTracker(f"http://127.0.0.1:{port}")
    tracker.start(experiment="upload-outage")
    recorder = LossRecorder("train", args.samples, tracker)
    ids = torch.arange(args.samples)

    def epoch_times(first: int) -> list[float]:
        times = []
        for epoch in range(first, first + args.epochs):
            recorder.update(ids, torch.rand(args.samples))
            start = time.perf_counter()
            recorder.end_epoch(epoch)
            times.append(time.perf_counter() - start)
        return times

    alone = LossRecorder("train", args.samples, local_dir=root / "no-tracker")  # the baseline: nothing to upload
    baseline = []
    for epoch in range(args.epochs):
        alone.update(ids, torch.rand(args.samples))
        start = time.perf_counter()
        alone.end_epoch(epoch)
        baseline.append(time.perf_counter() - start)
    up = epoch_times(0)
    server.terminate()
    server.wait()
    down = epoch_times(args.epochs)
    server = _server(root, port)
    start = time.perf_counter()
    tracker.finish()
    drained = time.perf_counter() - start
    server.terminate()
    up_ms, down_ms = statistics.median(up) * 1e3, statistics.median(down) * 1e3
    print(f"{args.samples} samples: end_epoch median {statistics.median(baseline) * 1e3:.1f} ms without a tracker, "
          f"{up_ms:.1f} ms with the server up, {down_ms:.1f} ms with it "
          f"down (ratio {down_ms / up_ms:.2f}); finish drained {args.epochs} queued tables in {drained:.1f} s "
          f"after the restart; left behind: {tracker.left_behind or 'nothing'}")


if __name__ == "__main__":
    main()
