"""How much of a run the spool folder holds: after each epoch and after `finish`, with uploaded tables deleted
(the default) and kept (`keep_local=True`).

    python bench/spool_size.py --samples 1000000 --epochs 20 --out bench/results

Starts a local `mlflow server` (sqlite backend, served artifacts), then trains twice on one split of
`--samples` per-sample losses for `--epochs` epochs, the own loop's way (`LossRecorder` with an
`MLflowTracker`): once as it comes, once with `keep_local=True`. Prints and writes (`--out`) `spool.md`,
a table of the spool's bytes, and `spool.png`, the spool's bytes after each `end_epoch` and after `finish`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upload_outage import _server as start_server  # noqa: E402 (bench/ is on the path: its one local server)
from tracking.backends import MLflowTracker  # noqa: E402
from tracking.record.recorder import LossRecorder  # noqa: E402

SPLIT = "train"


def bytes_under(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def train(uri: str, spool_root: Path, samples: int, epochs: int, keep_local: bool) -> dict:
    """One run; the spool's bytes after each `end_epoch` (tables still on their way included) and after `finish`."""
    os.environ["ACTION_SCORES_SPOOL"] = str(spool_root)
    tracker = MLflowTracker(uri, keep_local=keep_local)
    run_id = tracker.start(experiment="spool-size", run_name=f"keep_local={keep_local}")
    recorder = LossRecorder(SPLIT, samples, tracker)
    rng = np.random.default_rng(0)
    ids = torch.arange(samples)
    during = []
    for epoch in range(epochs):
        recorder.update(ids, torch.from_numpy(rng.exponential(1.0, samples).astype(np.float32)))
        recorder.end_epoch(epoch)
        during.append(bytes_under(spool_root))
    tracker.finish()
    spool = spool_root / f"mlflow-{run_id}"
    tracker.attach(run_id)
    uploaded = tracker.list_files(f"per_sample_losses/{SPLIT}")
    return {"keep_local": keep_local, "run_id": run_id, "during": during, "after": bytes_under(spool_root),
            "tables_left": len(list(spool.rglob("epoch_*.parquet"))), "tables_in_run": len(uploaded)}


def size(count: int) -> str:
    return f"{count / 1e6:,.1f} MB" if count >= 1e6 else f"{count:,} bytes"


def report(runs: list[dict], samples: int, epochs: int, command: str) -> str:
    lines = [f"`{command}`", "",
             f"One split of {samples:,} samples x {epochs} epochs (a loss column), own loop, `MLflowTracker` against a "
             f"local `mlflow server` (sqlite, served artifacts) on {os.cpu_count()} CPU cores.", "",
             "| spool | after finish | tables left in the spool | tables in the run | most after an `end_epoch` |",
             "| --- | --- | --- | --- | --- |"]
    for run in runs:
        name = "keep_local=True" if run["keep_local"] else "default (uploaded tables deleted)"
        lines.append(f"| {name} | {size(run['after'])} | {run['tables_left']} | {run['tables_in_run']} | "
                     f"{size(max(run['during']))} |")
    kept = next(run for run in runs if run["keep_local"])
    lines += ["", f"Kept, the spool grows by {kept['after'] / epochs / 1e6:.1f} MB per epoch of this split "
                  f"({kept['after'] / epochs / samples:.2f} bytes per sample per epoch: "
                  f"{kept['after'] / epochs * 100 / 1e9:.2f} GB for 100 epochs); by default it holds only the tables "
                  "not uploaded yet (the most after an `end_epoch`), and nothing once the run has them (`run.json` "
                  "stays).", "", "![spool size](spool.png)"]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for run in runs:
        points = [*run["during"], run["after"]]
        label = "keep_local=True" if run["keep_local"] else "default"
        axes.plot(range(len(points)), [value / 1e6 for value in points], marker="o", markersize=3, label=label)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel(f"after end_epoch(n); at {len(runs[0]['during'])}: after finish")
    axes.set_ylabel("spool folder (MB)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write spool.md and spool.png into this folder")
    args = parser.parse_args()
    os.environ.pop("ACTION_SCORES_KEEP_LOCAL", None)
    os.environ.update(MLFLOW_DISABLE_TELEMETRY="true")
    root = Path(tempfile.mkdtemp(prefix="spool-size-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(root, port)
    try:
        runs = [train(f"http://127.0.0.1:{port}", root / f"spool-{keep}", args.samples, args.epochs, keep)
                for keep in (False, True)]
    finally:
        server.terminate()
        server.wait()
    command = "python bench/spool_size.py " + " ".join(sys.argv[1:])
    text = report(runs, args.samples, args.epochs, command)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "spool.md").write_text("# bench/spool_size.py: the spool after a run\n\n" + text)
        plot(runs, args.out / "spool.png")


if __name__ == "__main__":
    main()
