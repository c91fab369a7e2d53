"""The job's stages on real runs: `scores.parquet` is the same with and without the report stage, and a W&B
run the job resumed is finished whatever happens (a real W&B offline run)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from tests.test_analyze import _make_wandb_run, _random_epochs
from tests.test_views import _train
from tracking import contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker, WandbTracker
from tracking.errors import ActionScoresError
from tracking.job import JobOptions

LABELS = [f"class {i % 3}" for i in range(12)]


def test_scores_parquet_is_the_same_with_and_without_panels(
        mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two runs of identical tables and media with label names (the view that groups by `label_name`):
    one analysed with panels, one without; their `scores.parquet` are equal, column for column."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    media = {"labels": LABELS, "texts": [f"sample {i}" for i in range(12)]}
    with_panels, _ = _train(MLflowTracker(mlflow_server), tmp_path / "a", media)
    without, _ = _train(MLflowTracker(mlflow_server), tmp_path / "b", media)
    drawn = analyze_run(MLflowTracker(mlflow_server), with_panels, top_k=3)
    assert drawn.views == {"test": "recorded media (text)"} and drawn.panels  # the report ran
    assert analyze_run(MLflowTracker(mlflow_server), without, panels=False).panels == []

    client = mlflow.MlflowClient(mlflow_server)
    path = f"{contract.scores_dir('test')}/{contract.SCORES_FILE}"
    first, second = (pd.read_parquet(client.download_artifacts(run, path, str(tmp_path / run)))
                     for run in (with_panels, without))
    assert list(first.columns) == list(second.columns)
    assert contract.LABEL_NAME not in first.columns  # the view's grouping column stays the report's
    pd.testing.assert_frame_equal(first, second, check_exact=True)


class _FailsAfterResuming(WandbTracker):
    """A real W&B offline tracker whose summary write fails, after the job has resumed the run to write."""

    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        raise RuntimeError("the summary could not be written")


def test_a_wandb_run_the_job_resumed_is_finished_when_the_job_fails(wandb_env: dict[str, str], tmp_path: Path) -> None:
    import wandb

    files, _, _ = _random_epochs(seed=3, n=20, epochs=2)
    folder = _make_wandb_run(tmp_path, files)
    run_id = folder.name.rsplit("-", 1)[1]

    with pytest.raises(RuntimeError, match="the summary could not be written"):
        analyze_run(_FailsAfterResuming(), str(folder), panels=False)
    assert wandb.run is None  # resumed to write the scores, then finished despite the failure
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # it was resumed
    assert analyze_run(WandbTracker(), str(folder), panels=False).status == "done"  # and can be analysed again


def test_job_options_are_checked_when_made() -> None:
    with pytest.raises(ActionScoresError, match="top_k must be positive, got 0"):
        JobOptions(top_k=0)
    with pytest.raises(ActionScoresError, match=r"unknown scoring engine 'polars'; choose one of \['arrow', 'duckdb', "
                                                r"'spark'\]"):
        JobOptions(engine="polars")
    named = JobOptions(pictures=len).picture_function
    assert named == ("len", len)
