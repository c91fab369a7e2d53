"""The streaming job: tables fetched in a bounded window and scored as they arrive, local stores read in
place, an experiment's runs analysed by several workers, and no dynamics warning for detection tables.

Against the session's real `mlflow server`, a real sqlite tracking URI with a local artifact folder,
and real parquet files.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracking import contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.cli import main
from tracking.errors import ActionScoresError
from tracking.fetch import Fetched, RunFiles
from tracking.scoring.engines import ENGINES

SPLIT = "test"


def _log_tables(client: mlflow.MlflowClient, run_id: str, tables: list[pa.Table], tmp: Path, split: str = SPLIT) -> list[str]:
    """Log one parquet file per epoch (pyarrow's defaults, as any client writes them); their artifact paths."""
    folder = tmp / uuid.uuid4().hex
    folder.mkdir(parents=True)
    paths = []
    for epoch, table in enumerate(tables):
        local = folder / contract.epoch_file_name(epoch)
        pq.write_table(table, local)
        client.log_artifact(run_id, str(local), contract.losses_dir(split))
        paths.append(f"{contract.losses_dir(split)}/{local.name}")
    client.set_terminated(run_id)
    return paths


def _losses(seed: int, samples: int, epochs: int) -> np.ndarray:
    return np.random.default_rng(seed).exponential(1.0, (epochs, samples)).astype(np.float32)


def _tables(losses: np.ndarray, **extra: pa.Array) -> list[pa.Table]:
    """Epoch tables of `losses[epoch, sample]`, each in a different row order."""
    rng = np.random.default_rng(0)
    tables = []
    for row in losses:
        order = rng.permutation(row.size)
        tables.append(pa.table({"sample_id": pa.array(order, pa.int64()), "loss": pa.array(row[order]),
                                **{name: values.take(pa.array(order)) for name, values in extra.items()}}))
    return tables


def _logged_scores(client: mlflow.MlflowClient, run_id: str, dst: Path) -> pd.DataFrame:
    local = client.download_artifacts(run_id, f"{contract.scores_dir(SPLIT)}/{contract.SCORES_FILE}", str(dst))
    return pd.read_parquet(local).set_index("sample_id").sort_index()


def test_tables_are_fetched_in_a_window_and_each_is_dropped_once_read(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    """A served store: the window's tables are in memory (`Fetched`), each handed over once; nothing on disk.
    The tables of an engine that needs files (`bounded=False`) are downloaded, and each copy deleted once read."""
    run_id = client.create_run(experiment_id).info.run_id
    paths = _log_tables(client, run_id, _tables(_losses(1, 20, 6)), tmp_path)
    tracker.attach(run_id)
    dst = tmp_path / "in"
    with RunFiles(tracker, dst, ahead=2, progress=False) as files:
        futures = files.stream(paths)
        first = [future.result(timeout=60) for future in futures[:2]]
        # The window is full: epoch 2 is not even asked for until the scorer has read one.
        assert not futures[2].done()
        assert all(isinstance(table, Fetched) for table in first)
        files.release(paths[0])
        assert isinstance(futures[2].result(timeout=60), Fetched)
        for path, future in zip(paths[1:], futures[1:]):
            future.result(timeout=60)
            files.release(path)
    assert not dst.exists()  # nothing was written to disk

    with RunFiles(tracker, dst, progress=False) as files:
        copies = [future.result(timeout=60) for future in files.stream(paths, bounded=False)]
        assert copies == [dst / path for path in paths] and all(path.is_file() for path in copies)
        files.release(paths[0])
        assert not copies[0].exists() and copies[1].exists()  # the read copy is gone, the unread one stays


def test_the_job_streams_a_run_and_sums_each_epoch_once(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """More epochs than the window (FETCH_AHEAD 3): every table still summed once, in epoch order."""
    import tracking.fetch

    monkeypatch.setattr(tracking.fetch, "FETCH_AHEAD", 3)
    losses = _losses(2, 40, 11)
    run_id = client.create_run(experiment_id).info.run_id
    _log_tables(client, run_id, _tables(losses), tmp_path)
    result = analyze_run(tracker, run_id, panels=False)
    assert result.status == "done" and result.epochs == {SPLIT: 11}
    scores = _logged_scores(client, run_id, tmp_path / "out")
    np.testing.assert_allclose(scores["action"].to_numpy(), losses.astype(np.float64).sum(axis=0), rtol=1e-12)
    assert scores["rank"].to_numpy()[np.argmax(losses.astype(np.float64).sum(axis=0))] == 1


def test_a_table_that_fails_to_download_fails_the_job_and_writes_nothing(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    run_id = client.create_run(experiment_id).info.run_id
    paths = _log_tables(client, run_id, _tables(_losses(3, 10, 3)), tmp_path)
    tracker.attach(run_id)
    with RunFiles(tracker, tmp_path / "in", ahead=2, progress=False) as files:
        futures = files.stream([*paths[:1], f"{contract.losses_dir(SPLIT)}/epoch_0009.parquet"])
        assert isinstance(futures[0].result(timeout=60), Fetched)
        with pytest.raises(Exception):  # the server's 404, raised where the scorer waits for the file
            futures[1].result(timeout=60)
    for fetch in (lambda path: tracker.download(path, tmp_path / "in"), tracker.fetch):
        with pytest.raises(ActionScoresError, match="escapes the run's artifact folder"):
            fetch("../elsewhere/epoch_0000.parquet")


def test_a_local_store_is_read_in_place_and_left_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sqlite tracking URI with a local artifact folder: the job reads the store's own files (no copy),
    and deletes none of them."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(f"local-{uuid.uuid4().hex[:8]}", (tmp_path / "store").as_uri())
    run_id = client.create_run(experiment).info.run_id
    losses = _losses(4, 30, 4)
    paths = _log_tables(client, run_id, _tables(losses), tmp_path / "written")
    tracker = MLflowTracker(uri)
    tracker.attach(run_id)
    stored = [tracker.local_file(path) for path in paths]
    assert all(p is not None and p.is_file() and p.is_relative_to(tmp_path / "store") for p in stored)
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in stored]
    with RunFiles(tracker, tmp_path / "in", progress=False) as files:
        assert [future.result() for future in files.stream(paths)] == stored  # the store's own files
        for path in paths:
            files.release(path)
    assert not (tmp_path / "in").exists()  # nothing was copied

    result = analyze_run(tracker, run_id, panels=False)
    assert result.status == "done"
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in stored] == digests  # read, never deleted or changed
    scores = _logged_scores(client, run_id, tmp_path / "out")
    np.testing.assert_allclose(scores["action"].to_numpy(), losses.astype(np.float64).sum(axis=0), rtol=1e-12)


def test_a_served_store_is_downloaded_even_on_this_machine(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    run_id = client.create_run(experiment_id).info.run_id
    paths = _log_tables(client, run_id, _tables(_losses(5, 5, 1)), tmp_path)
    tracker.attach(run_id)
    assert tracker.local_file(paths[0]) is None  # mlflow-artifacts:/ behind the server: fetched over HTTP


def test_an_experiment_is_analysed_by_several_workers_and_a_broken_run_is_named(
        client: mlflow.MlflowClient, mlflow_server: str, experiment_id: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    name = client.get_experiment(experiment_id).name
    good = {}
    for seed in range(4):
        losses = _losses(10 + seed, 12, 3)
        run_id = client.create_run(experiment_id).info.run_id
        _log_tables(client, run_id, _tables(losses), tmp_path)
        good[run_id] = losses
    broken = client.create_run(experiment_id).info.run_id  # a table with a wrong schema: integer losses
    wrong = pa.table({"sample_id": pa.array([0, 1], pa.int64()), "loss": pa.array([1, 2], pa.int64())})
    _log_tables(client, broken, [wrong, wrong], tmp_path)

    code = main(["analyze", "--experiment", name, "--workers", "3", "--no-panels", "--tracking-uri", mlflow_server])

    out = capsys.readouterr().out
    assert code == 1
    assert f"experiment {name!r}: 4 done, 0 skipped, 1 failed:" in out
    assert f"  run {broken}: {contract.losses_dir(SPLIT)}/epoch_0000.parquet: column 'loss' must be float, got int64" in out
    for run_id, losses in good.items():
        assert f"run {run_id}: done ({SPLIT}: 12 samples x 3 epochs)" in out
        scores = _logged_scores(client, run_id, tmp_path / run_id)
        np.testing.assert_allclose(scores["action"].to_numpy(), losses.astype(np.float64).sum(axis=0), rtol=1e-12)
    assert contract.STATUS_TAG not in client.get_run(broken).data.tags


def test_workers_must_be_positive_and_go_with_an_experiment(mlflow_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--run-id", "x", "--workers", "2", "--tracking-uri", mlflow_server]) == 2
    assert "--workers applies to --experiment only" in capsys.readouterr().err
    assert main(["analyze", "--experiment", "x", "--workers", "0", "--tracking-uri", mlflow_server]) == 2
    assert "workers must be at least 1, got 0" in capsys.readouterr().err


# --- detection tables: the dynamics scores never apply, so no warning ---------------------------------


def _score_files(tmp_path: Path, engine: str, tables: list[pa.Table]) -> pd.DataFrame:
    folder = tmp_path / engine
    folder.mkdir()
    pairs = []
    for epoch, table in enumerate(tables):
        pq.write_table(table, folder / contract.epoch_file_name(epoch))
        pairs.append((contract.epoch_file_name(epoch), folder / contract.epoch_file_name(epoch)))
    return ENGINES[engine].score(SPLIT, pairs, None, None, False)


def _parts(losses: np.ndarray, **extra: pa.Array) -> list[pa.Table]:
    """Detection tables: `loss` and its parts `loss_loc`, `loss_pos`, `loss_neg` (here each a third of it)."""
    return [table.append_column("loss_loc", pa.array(third)).append_column("loss_pos", pa.array(third))
                 .append_column("loss_neg", pa.array(third))
            for table in _tables(losses, **extra) for third in [table["loss"].to_numpy() / np.float32(3)]]


@pytest.mark.parametrize("engine", ["arrow", "duckdb"])
def test_detection_tables_get_no_dynamics_warning(tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture) -> None:
    losses = _losses(6, 8, 2)
    with caplog.at_level(logging.WARNING, logger="tracking"):
        scores = _score_files(tmp_path, engine, _parts(losses))
    assert "missing" not in scores.attrs
    assert not [r for r in caplog.records if "dynamics" in r.getMessage() or "no confidence" in r.getMessage()]
    np.testing.assert_allclose(scores.sort_values("sample_id")["action_loc"].to_numpy(),
                               (losses.astype(np.float64) / 3).sum(axis=0), rtol=1e-6)


@pytest.mark.parametrize("engine", ["arrow", "duckdb"])
def test_classification_tables_without_dynamics_columns_still_warn(
        tmp_path: Path, engine: str, caplog: pytest.LogCaptureFixture) -> None:
    expected = {"arrow": "no confidence, variability: the tables have no 'p_true' column",
                "duckdb": "no training-dynamics scores: the duckdb engine sums losses only"}[engine]
    with caplog.at_level(logging.WARNING, logger="tracking"):
        scores = _score_files(tmp_path, engine, _tables(_losses(7, 8, 2)))
    assert expected in scores.attrs["missing"]
    assert any(expected in record.getMessage() for record in caplog.records)


def test_a_loss_in_parts_with_some_dynamics_columns_still_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Parts plus a recorded column: the run meant to have dynamics, so the missing ones are named."""
    correct = pa.array([True, False] * 4)
    with caplog.at_level(logging.WARNING, logger="tracking"):
        scores = _score_files(tmp_path, "arrow", _parts(_losses(8, 8, 2), correct=correct))
    assert "correctness" in scores.columns
    assert "no aum: the tables have no 'margin' column" in scores.attrs["missing"]
