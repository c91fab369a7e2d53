"""Several backends as one (`--tracker both`): every write goes to each, reads come from the first."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracking.backends.base import Tracker
from tracking.backends.mlflow_backend import MLflowTracker
from tracking.backends.uploads import unwritten_error
from tracking.backends.wandb_backend import WandbTracker
from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    import pandas as pd


class FanOutTracker(Tracker):
    """Several backends as one (`--tracker both`): every write goes to each, reads come from the first.

    Each family goes to the same family of each backend, so training's `log_*` writes wait for neither."""

    name = "both"

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or [MLflowTracker(), WandbTracker()]

    @property
    def run_id(self) -> str:
        return self.trackers[0].run_id

    @property
    def native(self) -> Any:
        return [tracker.native for tracker in self.trackers]

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        for tracker in self.trackers:
            tracker.start(experiment, run_name)
        # Each run names the others, so that the same training can be found on every backend.
        self.set_tags({f"action_scores.{tracker.name}_run_id": tracker.run_id for tracker in self.trackers})
        return self.run_id

    def attach(self, run_id: str) -> None:
        names = " or ".join(repr(tracker.name) for tracker in self.trackers)
        raise ActionScoresError(f"{self.name!r} writes to several backends; attach to one at a time: {names}")

    def finish(self, failed: bool = False) -> None:
        """After the tables handed to `log_table` reach every backend (bounded wait), finish each: as failed
        when one could not be written, which is then raised unless `failed` already says so."""
        unwritten = self._close_table_uploads()
        for tracker in self.trackers:
            tracker.finish(failed or bool(unwritten))
        if unwritten and not failed:
            raise unwritten_error(self.run_id, unwritten)

    def write_params(self, params: Mapping[str, object]) -> None:
        for tracker in self.trackers:
            tracker.write_params(params)

    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.write_metrics(metrics, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for tracker in self.trackers:
            tracker.set_tags(tags)

    def write_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        for tracker in self.trackers:
            tracker.write_artifact(local_path, artifact_dir)

    def _keeps_handed_over_files(self) -> bool:
        """MLflow's uploader reads the table later, from this spool folder: keep it (MLflow deletes only its own)."""
        return True

    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        """Each backend's own hand-over (MLflow queues it; W&B copies it): on the writer thread for `log_table`."""
        for tracker in self.trackers:
            tracker.log_artifact(local_path, artifact_dir)

    def log_params(self, params: Mapping[str, object]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def write_dataset(self, local_path: str | Path, artifact_dir: str, name: str, context: str) -> None:
        for tracker in self.trackers:
            tracker.write_dataset(local_path, artifact_dir, name, context)

    def write_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.write_samples(key, rows)

    def write_scatter(self, key: str, points: pd.DataFrame, x: str, y: str, title: str) -> None:
        for tracker in self.trackers:
            tracker.write_scatter(key, points, x, y, title)

    def params(self) -> dict[str, str]:
        return self.trackers[0].params()

    def tags(self) -> dict[str, str]:
        return self.trackers[0].tags()

    def list_files(self, artifact_dir: str) -> list[str]:
        return self.trackers[0].list_files(artifact_dir)

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        return self.trackers[0].download(artifact_path, dst_dir)

    def find_runs(self, experiment: str) -> list[str]:
        return self.trackers[0].find_runs(experiment)

    def artifact_uri(self, artifact_path: str) -> str:
        return self.trackers[0].artifact_uri(artifact_path)

    def ui_url(self, artifact_path: str) -> str | None:
        return self.trackers[0].ui_url(artifact_path)
