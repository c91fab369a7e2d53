"""The paper's CIFAR-10 run, trained where a GPU is but MLflow is not, then analysed here.

    # on the GPU machine (torch, pandas, pyarrow; no MLflow needed):
    python bench/paper_cifar10.py train --data-root /tmp/data/cifar10 --out /tmp/paper --epochs 15
    # back here, with the tracking server the panels should land on:
    python bench/paper_cifar10.py import --run-dir /tmp/paper --data-root /tmp/data/cifar10 \
        --tracking-uri sqlite:///mlflow.db --experiment cifar10-paper
    action-scores analyze --run-id <printed id>

`train` runs the very `experiments.classify` entry point with a tracker that writes the
artifact contract into a folder; `import` replays that folder into an MLflow run. It also
shows the contract at work: the job only needs the tables, whoever wrote them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracking import contract  # noqa: E402
from tracking.backends import TRACKERS, Tracker, make_tracker  # noqa: E402


class FolderTracker(Tracker):
    """Writes a run to a folder: params.json, tags.json, metrics.jsonl and the artifact tree."""

    name = "folder"
    root = Path("paper-run")

    @property
    def native(self) -> Any:
        return self.root

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self._run_id = run_name or "run"
        return self._run_id

    def attach(self, run_id: str) -> None:
        self._run_id = run_id

    def finish(self, failed: bool = False) -> None:
        self.set_tags({"status": "FAILED" if failed else "FINISHED"})

    def _update(self, name: str, values: Mapping[str, object]) -> None:
        path = self.root / name
        current = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**current, **{k: str(v) for k, v in values.items()}}, indent=1))

    def write_params(self, params: Mapping[str, object]) -> None:
        self._update("params.json", params)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._update("tags.json", tags)

    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        with (self.root / "metrics.jsonl").open("a") as lines:
            lines.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def write_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        target = self.root / "artifacts" / artifact_dir
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local_path, target / Path(local_path).name)

    def params(self) -> dict[str, str]:
        return json.loads((self.root / "params.json").read_text())

    def tags(self) -> dict[str, str]:
        return json.loads((self.root / "tags.json").read_text())

    def list_files(self, artifact_dir: str) -> list[str]:
        base = self.root / "artifacts"
        return sorted(p.relative_to(base).as_posix() for p in (base / artifact_dir).rglob("*") if p.is_file())

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        raise NotImplementedError("a folder run is read by `import`, not by the job")

    def find_runs(self, experiment: str) -> list[str]:
        return []

    def artifact_uri(self, artifact_path: str) -> str:
        return str(self.root / "artifacts" / artifact_path)


def train(args: argparse.Namespace, rest: list[str]) -> None:
    from experiments import classify

    FolderTracker.root = Path(args.out)
    TRACKERS[FolderTracker.name] = FolderTracker
    started = time.perf_counter()
    classify.main(["--dataset", "imagefolder", "--data-root", args.data_root, "--epochs", str(args.epochs),
                   "--batch-size", "128", "--tracker", FolderTracker.name, *rest])
    print(f"trained in {time.perf_counter() - started:.0f} s")


def replay(args: argparse.Namespace) -> None:
    """Log a folder run into a new run of the tracker named by --tracker (MLflow by default)."""
    import os

    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    folder = Path(args.run_dir)
    params = json.loads((folder / "params.json").read_text())
    params[contract.DATA_ROOT_PARAM] = str(Path(args.data_root).resolve())  # where the images are here
    tracker = make_tracker(args.tracker)
    tracker.start(experiment=args.experiment, run_name="classify-cifar10-paper")
    tracker.write_params(params)
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        record.pop("time")
        tracker.write_metrics(record, step=step)
    for top in sorted((folder / "artifacts").iterdir()):
        tracker.write_artifacts(top, top.name)
    tracker.finish()
    print(f"imported as run {tracker.run_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser("train", help="train and write the run into a folder (extra args go to classify)")
    trainer.add_argument("--data-root", required=True)
    trainer.add_argument("--out", required=True)
    trainer.add_argument("--epochs", type=int, default=15)
    importer = commands.add_parser("import", help="log a folder run into a tracker")
    importer.add_argument("--run-dir", required=True)
    importer.add_argument("--data-root", required=True)
    importer.add_argument("--tracking-uri", default="")
    importer.add_argument("--experiment", default="cifar10-paper")
    importer.add_argument("--tracker", default="mlflow")
    args, rest = parser.parse_known_args()
    if args.command == "train":
        train(args, rest)
    else:
        replay(args)


if __name__ == "__main__":
    main()
