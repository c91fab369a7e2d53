"""The DuckDB engine gives the default engine's scores on a run recorded to the real MLflow server,
and refuses what the default engine refuses."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from tracking import contract
from tracking.analyze import analyze_run
from tracking.scoring.engines import score_split
from tracking.scoring.tables import epoch_files
from tracking.scoring.duckdb_engine import score_folder_duckdb
from tracking.errors import ActionScoresError
from tracking.record.recorder import LossRecorder, write_table
from tracking.backends import MLflowTracker

SAMPLES, EPOCHS = 500, 4


def test_duckdb_scores_equal_the_default_engine_on_a_recorded_run(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Starting a run exports MLFLOW_EXPERIMENT_ID (mlflow.set_experiment): have monkeypatch
    # put the variable back as it was, or later tests' `mlflow run` would get two experiments.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    rng = np.random.default_rng(3)
    tracker = MLflowTracker(mlflow_server)
    tracker.start(experiment=f"duckdb-{uuid.uuid4().hex[:8]}")
    recorder = LossRecorder("val", num_samples=SAMPLES, tracker=tracker, local_dir=tmp_path / "rec")
    labels = torch.as_tensor(rng.integers(0, 7, SAMPLES))
    for epoch in range(EPOCHS):
        for ids in np.array_split(rng.permutation(SAMPLES), 9):
            ids_t = torch.as_tensor(ids)
            parts = {name: torch.as_tensor(rng.exponential(scale, ids.size), dtype=torch.float32)
                     for name, scale in (("loc", 1.0), ("neg", 3.0))}
            recorder.update(ids_t, parts, target=labels[ids_t])
        recorder.end_epoch(epoch)
    tracker.finish()

    by_split = epoch_files(tracker.list_files(contract.LOSSES_DIR))
    local = {path: tracker.download(path, tmp_path / "in") for path in by_split["val"]}
    expected = score_split("val", [(path, local[path]) for path in by_split["val"]])
    scores = score_folder_duckdb(local[by_split["val"][0]].parent, "val")

    assert list(scores.columns) == list(expected.columns)
    assert list(scores.columns) == ["sample_id", "epochs", "action", "action_loc", "action_neg", "mean_loss",
                                    "rank", "label"]
    pd.testing.assert_frame_equal(scores, expected, check_exact=False, rtol=1e-12, check_dtype=True)
    assert (scores["label"].to_numpy() == labels.numpy()).all()
    assert (scores["epochs"] == EPOCHS).all()

    # The job with --engine duckdb logs the same scores to the run.
    result = analyze_run(tracker, tracker.run_id, panels=False, engine="duckdb")
    assert result.status == "done" and result.samples == {"val": SAMPLES}
    logged = tracker.download(f"{contract.scores_dir('val')}/{contract.SCORES_FILE}", tmp_path / "out")
    pd.testing.assert_frame_equal(pd.read_parquet(logged), expected, check_exact=False, rtol=1e-12)
    with pytest.raises(ActionScoresError, match=r"unknown scoring engine 'polars'; choose one of \['arrow', 'duckdb', "
                                                r"'spark'\]"):
        analyze_run(tracker, tracker.run_id, force=True, engine="polars")


def _write(folder: Path, epoch: int, ids: list[int], losses: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"sample_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float32())})
    write_table(table, folder / contract.epoch_file_name(epoch))


def test_a_sample_missing_from_an_epoch_is_named(tmp_path: Path) -> None:
    _write(tmp_path, 0, [0, 1, 2, 3], [1, 1, 1, 1])
    _write(tmp_path, 1, [0, 1, 3], [1, 1, 1])
    with pytest.raises(ActionScoresError, match=r"samples \[2\] are not in every one of the 2 epoch tables"):
        score_folder_duckdb(tmp_path, "test")


def test_a_sample_repeated_in_one_epoch_and_missing_from_another_is_named(tmp_path: Path) -> None:
    """Its count of rows is still the number of epochs: only which epochs it is in gives it away."""
    _write(tmp_path, 0, [0, 1, 2, 3], [1, 1, 1, 1])
    _write(tmp_path, 1, [0, 1, 2, 2, 3], [1, 1, 1, 1, 1])
    _write(tmp_path, 2, [0, 1, 3], [1, 1, 1])
    with pytest.raises(ActionScoresError, match=r"samples \[2\] are not in every one of the 3 epoch tables exactly once"):
        score_folder_duckdb(tmp_path, "test")


def test_non_finite_losses_are_named_not_summed(tmp_path: Path) -> None:
    _write(tmp_path, 0, [0, 1, 2], [1, float("nan"), 1])
    _write(tmp_path, 1, [0, 1, 2], [1, 1, float("inf")])
    with pytest.raises(ActionScoresError, match=r"NaN or infinite losses in samples \[1, 2\]"):
        score_folder_duckdb(tmp_path, "test")


def test_a_gap_in_the_epochs_and_an_empty_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match="no epoch_EEEE.parquet tables for split 'test'"):
        score_folder_duckdb(tmp_path, "test")
    _write(tmp_path, 0, [0, 1], [1, 1])
    _write(tmp_path, 2, [0, 1], [1, 1])
    with pytest.raises(ActionScoresError, match=r"epoch tables missing: \[epoch_0001.parquet\]"):
        score_folder_duckdb(tmp_path, "test")


def test_files_with_other_columns_than_epoch_0_are_refused(tmp_path: Path) -> None:
    _write(tmp_path, 0, [0, 1], [1, 1])
    table = pa.table({"sample_id": pa.array([0, 1], pa.int64()), "loss": pa.array([1, 1], pa.float32()),
                      "loss_loc": pa.array([1, 1], pa.float32())})
    write_table(table, tmp_path / contract.epoch_file_name(1))
    with pytest.raises(ActionScoresError, match=r"epoch_0001.parquet: loss columns \['loss', 'loss_loc'\] differ "
                                                r"from epoch 0's \['loss'\]"):
        score_folder_duckdb(tmp_path, "test")
    (tmp_path / contract.epoch_file_name(1)).write_text("not parquet")
    with pytest.raises(ActionScoresError, match="epoch_0001.parquet is not a readable parquet file"):
        score_folder_duckdb(tmp_path, "test")
