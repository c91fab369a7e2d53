"""The job's fetch from a store the tracking server serves over HTTP: each epoch table straight into memory
by one GET (`MLflowTracker.fetch`), byte for byte the file logged, read once, and scored to the numpy sum of
the tables; other stores say None (downloaded or read in place instead).

Against the session's real `mlflow server` and a real sqlite tracking URI with a local artifact folder.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from tracking import contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.fetch import Fetched, RunFiles, open_table
from tracking.scoring.engines import score_split

SPLIT = "train"


def _log_epochs(client: mlflow.MlflowClient, run_id: str, losses: np.ndarray, folder: Path) -> list[Path]:
    """One parquet file per epoch of `losses[epoch, sample]`, rows in a shuffled order; the local files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = []
    for epoch, row in enumerate(losses):
        order = rng.permutation(row.size)
        path = folder / contract.epoch_file_name(epoch)
        pq.write_table(pa.table({"sample_id": pa.array(order, pa.int64()), "loss": pa.array(row[order])}), path)
        client.log_artifact(run_id, str(path), contract.losses_dir(SPLIT))
        written.append(path)
    client.set_terminated(run_id)
    return written


def test_a_served_table_is_fetched_into_memory_byte_for_byte_and_read_once(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    losses = np.random.default_rng(1).exponential(1.0, (3, 50)).astype(np.float32)
    run_id = client.create_run(experiment_id).info.run_id
    written = _log_epochs(client, run_id, losses, tmp_path / "written")
    tracker.attach(run_id)
    paths = [f"{contract.losses_dir(SPLIT)}/{path.name}" for path in written]
    assert [tracker.fetch(path) for path in paths] == [path.read_bytes() for path in written]

    with RunFiles(tracker, tmp_path / "in", progress=False) as files:
        arrival = files.stream(paths)[0]
        assert isinstance(arrival.result(timeout=60), Fetched)
        table = pq.read_table(open_table(arrival))
        np.testing.assert_array_equal(table.sort_by("sample_id")["loss"].to_numpy(), losses[0])
        with pytest.raises(RuntimeError, match="read once"):  # its bytes were handed over, not kept
            open_table(arrival)
    assert not (tmp_path / "in").exists()


def test_an_engine_scores_the_readers_of_tables_still_arriving_in_epoch_order(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    """`RunFiles.tables`: (artifact path, reader) pairs in the order asked, each reader waiting for its table;
    the engine sums them without knowing how they arrive, and releases each once read."""
    losses = np.random.default_rng(4).exponential(1.0, (5, 30)).astype(np.float32)
    run_id = client.create_run(experiment_id).info.run_id
    written = _log_epochs(client, run_id, losses, tmp_path / "written")
    tracker.attach(run_id)
    paths = [f"{contract.losses_dir(SPLIT)}/{path.name}" for path in written]
    released = []
    with RunFiles(tracker, tmp_path / "in", ahead=2, progress=False) as files:
        tables = files.tables(paths)
        assert [name for name, _ in tables] == paths

        def done(epoch: int) -> None:
            released.append(epoch)
            files.release(paths[epoch])

        scores = score_split(SPLIT, tables, done=done, progress=False).set_index("sample_id").sort_index()
    assert sorted(released) == list(range(5))
    np.testing.assert_allclose(scores["action"].to_numpy(), losses.astype(np.float64).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scores["mean_loss"].to_numpy(), losses.astype(np.float64).mean(axis=0), rtol=1e-12)


def test_the_job_on_a_served_store_scores_the_numpy_sum_of_its_tables(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More epochs than the window (FETCH_AHEAD 2) and than the fetch threads (DOWNLOAD_THREADS 3)."""
    import tracking.fetch

    monkeypatch.setattr(tracking.fetch, "FETCH_AHEAD", 2)
    monkeypatch.setattr(tracking.fetch, "DOWNLOAD_THREADS", 3)
    losses = np.random.default_rng(2).exponential(1.0, (9, 300)).astype(np.float32)
    run_id = client.create_run(experiment_id).info.run_id
    _log_epochs(client, run_id, losses, tmp_path / "written")

    result = analyze_run(tracker, run_id, panels=False)

    assert (result.status, result.samples, result.epochs) == ("done", {SPLIT: 300}, {SPLIT: 9})
    local = client.download_artifacts(run_id, f"{contract.scores_dir(SPLIT)}/{contract.SCORES_FILE}", str(tmp_path))
    scores = pd.read_parquet(local).set_index("sample_id").sort_index()
    expected = losses.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(scores["action"].to_numpy(), expected, rtol=1e-12)
    assert scores["rank"].to_numpy()[np.argmax(expected)] == 1
    tags = client.get_run(run_id).data.tags
    assert tags[contract.STATUS_TAG] == contract.STATUS_DONE and contract.LOCK_TAG not in tags


def test_a_missing_table_is_the_server_s_404_and_a_local_store_is_not_fetched(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = client.create_run(experiment_id).info.run_id
    tracker.attach(run_id)
    with pytest.raises(requests.HTTPError, match="404 Client Error.*No such artifact"):  # as MLflow's own download
        tracker.fetch(f"{contract.losses_dir(SPLIT)}/epoch_0000.parquet")

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local_client = mlflow.MlflowClient(uri)
    experiment = local_client.create_experiment(f"local-{uuid.uuid4().hex[:8]}", (tmp_path / "store").as_uri())
    local_run = local_client.create_run(experiment).info.run_id
    _log_epochs(local_client, local_run, np.ones((1, 4), np.float32), tmp_path / "written")
    local = MLflowTracker(uri)
    local.attach(local_run)
    assert local.fetch(f"{contract.losses_dir(SPLIT)}/epoch_0000.parquet") is None  # read in place instead



def test_past_the_memory_budget_the_window_s_tables_go_to_disk_and_each_copy_is_deleted_once_read(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tracking.fetch

    run_id = client.create_run(experiment_id).info.run_id
    written = _log_epochs(client, run_id, np.ones((5, 10), np.float32), tmp_path / "written")
    paths = [f"{contract.losses_dir(SPLIT)}/{path.name}" for path in written]
    tracker.attach(run_id)
    monkeypatch.setattr(tracking.fetch, "FETCH_MEMORY", min(path.stat().st_size for path in written))
    dst = tmp_path / "in"
    with RunFiles(tracker, dst, ahead=2, progress=False) as files:
        futures = files.stream(paths)
        # The first two start together, the memory still empty: both come into memory.
        assert all(isinstance(future.result(timeout=60), Fetched) for future in futures[:2])
        files.release(paths[0])  # epoch 1 still holds the budget: epoch 2 goes to disk
        assert futures[2].result(timeout=60) == dst / paths[2]
        assert (dst / paths[2]).read_bytes() == written[2].read_bytes()
        files.release(paths[1])  # the memory is empty again: epoch 3 comes into it
        assert isinstance(futures[3].result(timeout=60), Fetched)
        files.release(paths[2])  # the copy is deleted once read; epoch 4 finds epoch 3 holding the budget
        assert not (dst / paths[2]).exists()
        assert futures[4].result(timeout=60) == dst / paths[4]
        files.release(paths[3])
        files.release(paths[4])
    assert [p for p in dst.rglob("*") if p.is_file()] == []
