"""The spool holds a table only until the tracker has it: after a run against a real MLflow server the run has
every table and the spool none (`keep_local` keeps them); a replay or a resumed process deletes what it uploads;
a recorder without a tracker removes its temporary folder when it is gone."""

from __future__ import annotations

import gc
import hashlib
import os
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import in_process_training, run_command
from tests.test_uploads import RestartableServer, server, spool_root  # noqa: F401 (fixtures)
from tracking.backends import MLflowTracker
from tracking.record.media import record_media
from tracking.record.recorder import LossRecorder

SAMPLES, EPOCHS = 8, 3
TABLES = [f"per_sample_losses/test/epoch_{epoch:04d}.parquet" for epoch in range(EPOCHS)]
MEDIA = "per_sample_media/test/media.parquet"


def _losses(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((EPOCHS, SAMPLES)).astype(np.float32)


def _record(tracker: MLflowTracker, losses: np.ndarray, epochs: range, media: bool = True) -> None:
    """Epochs of the `test` split (and its media), as the own loop records them; `finish` is the caller's."""
    recorder = LossRecorder("test", num_samples=SAMPLES, tracker=tracker)
    if media:
        recorder.record_media(np.arange(SAMPLES), texts=[f"sample {i}" for i in range(SAMPLES)])
    for epoch in epochs:
        recorder.update(torch.arange(SAMPLES), torch.from_numpy(losses[epoch]))
        recorder.end_epoch(epoch)


def _files_left(spool: Path) -> list[str]:
    """The tables and media still in a spool folder."""
    return sorted(path.relative_to(spool).as_posix() for path in spool.rglob("*.parquet"))


def _on_server(client: mlflow.MlflowClient, run_id: str, names: list[str], folder: Path) -> dict[str, bytes]:
    return {name: Path(client.download_artifacts(run_id, name, str(folder / uuid.uuid4().hex))).read_bytes()
            for name in names}


def _column(content: bytes, name: str, folder: Path) -> list:
    """Column `name` of the parquet table whose bytes are `content`."""
    path = folder / f"{uuid.uuid4().hex}.parquet"
    path.write_bytes(content)
    return pq.read_table(path).column(name).to_pylist()


def test_the_run_has_every_table_and_the_spool_none_but_the_users_own_file(
        mlflow_server: str, spool_root: Path, tmp_path: Path) -> None:  # noqa: F811
    losses = _losses(1)
    mine = tmp_path / "notes.txt"  # a file of the user's, handed over from outside the spool
    mine.write_text("kept where it is")
    with in_process_training(mlflow_server):
        tracker = MLflowTracker(mlflow_server)
        run_id = tracker.start(experiment=f"spool-{uuid.uuid4().hex[:8]}")
        _record(tracker, losses, range(EPOCHS))
        tracker.log_artifact(mine, "notes")
        tracker.finish()
    assert tracker.left_behind == ""
    spool = spool_root / f"mlflow-{run_id}"
    assert _files_left(spool) == []
    assert sorted((spool / "pending").iterdir()) == []
    client = mlflow.MlflowClient(mlflow_server)
    uploaded = _on_server(client, run_id, [*TABLES, MEDIA, "notes/notes.txt"], tmp_path / "down")
    assert [_column(uploaded[name], "loss", tmp_path) for name in TABLES] == losses.tolist()
    assert _column(uploaded[MEDIA], "text", tmp_path) == [f"sample {i}" for i in range(SAMPLES)]
    assert (uploaded["notes/notes.txt"], mine.read_text()) == (b"kept where it is", "kept where it is")
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_keep_local_keeps_the_spooled_tables_as_the_run_has_them(
        mlflow_server: str, spool_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        how: str) -> None:
    if how == "environment":
        monkeypatch.setenv("ACTION_SCORES_KEEP_LOCAL", "1")
    with in_process_training(mlflow_server):
        tracker = MLflowTracker(mlflow_server, keep_local=True if how == "argument" else None)
        run_id = tracker.start(experiment=f"keep-{uuid.uuid4().hex[:8]}")
        _record(tracker, _losses(2), range(EPOCHS))
        tracker.finish()
    spool = spool_root / f"mlflow-{run_id}"
    assert _files_left(spool) == sorted([*TABLES, MEDIA])
    uploaded = _on_server(mlflow.MlflowClient(mlflow_server), run_id, [*TABLES, MEDIA], tmp_path)
    assert {name: (spool / name).read_bytes() for name in uploaded} == uploaded


def test_a_replay_and_a_resumed_process_delete_what_they_upload(
        server: RestartableServer, spool_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Two runs whose tables wait in the spool for a server that went away: one is uploaded by
    `action-scores upload`, the other by its training resumed on the run."""
    for variable, value in {"ACTION_SCORES_UPLOAD_WAIT": "1", "ACTION_SCORES_UPLOAD_BACKOFF": "1",
                            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(variable, value)
    losses = {"replayed": _losses(3), "resumed": _losses(4)}
    with in_process_training(server.uri):
        trackers = {name: MLflowTracker(server.uri) for name in losses}
        runs = {"replayed": trackers["replayed"].start(experiment=f"away-{uuid.uuid4().hex[:8]}")}
        client = mlflow.MlflowClient(server.uri)  # one active run per process: the other, as a second process's
        runs["resumed"] = client.create_run(client.get_run(runs["replayed"]).info.experiment_id).info.run_id
        trackers["resumed"].attach(runs["resumed"])
        server.stop()
        _record(trackers["replayed"], losses["replayed"], range(EPOCHS))
        _record(trackers["resumed"], losses["resumed"], range(2))  # the checkpoint of epoch 1, then the process died
        for tracker in trackers.values():
            tracker.finish()
            assert "did not take" in tracker.left_behind
    spools = {name: spool_root / f"mlflow-{run_id}" for name, run_id in runs.items()}
    spooled = {name: {table: hashlib.sha256((spool / table).read_bytes()).hexdigest() for table in _files_left(spool)}
               for name, spool in spools.items()}
    assert {name: sorted(tables) for name, tables in spooled.items()} == {
        "replayed": sorted([*TABLES, MEDIA]), "resumed": sorted([*TABLES[:2], MEDIA])}
    server.start()

    run_command(["action-scores", "upload", "--spool", str(spools["replayed"]), "--tracking-uri", server.uri],
                dict(os.environ, MLFLOW_TRACKING_URI=server.uri))
    assert _files_left(spools["replayed"]) == []

    with in_process_training(server.uri):
        monkeypatch.setenv("MLFLOW_RUN_ID", runs["resumed"])  # the resumed process's launcher exports it
        resumed = MLflowTracker(server.uri)
        assert resumed.start() == runs["resumed"]
        _record(resumed, losses["resumed"], range(2, EPOCHS), media=False)
        resumed.finish()
    assert resumed.left_behind == ""
    assert _files_left(spools["resumed"]) == []

    for name, run_id in runs.items():
        uploaded = _on_server(client, run_id, [*TABLES, MEDIA], tmp_path / name)
        assert {table: hashlib.sha256(uploaded[table]).hexdigest() for table in spooled[name]} == spooled[name]
        assert [_column(uploaded[table], "loss", tmp_path) for table in TABLES] == losses[name].tolist()
        assert client.get_run(run_id).info.status == "FINISHED"


def test_a_recorder_without_a_tracker_removes_its_temporary_folder_once_it_is_gone(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=SAMPLES)
    recorder.update(torch.arange(SAMPLES), torch.full((SAMPLES,), 0.25))
    table = recorder.end_epoch(0)
    folder = recorder.local_dir
    assert pq.read_table(table).column("loss").to_pylist() == [0.25] * SAMPLES  # readable while the recorder lives
    summary = record_media(None, "test", np.arange(2), texts=["a", "b"])
    media_folder = summary.path.parents[2]
    assert pq.read_table(summary.path).column("text").to_pylist() == ["a", "b"]
    kept = LossRecorder("test", num_samples=SAMPLES, local_dir=tmp_path / "mine")
    kept.update(torch.arange(SAMPLES), torch.zeros(SAMPLES))
    mine = kept.end_epoch(0)
    del recorder, summary, kept
    gc.collect()
    assert (folder.name.startswith("action-scores-"), folder.exists()) == (True, False)
    assert (media_folder.name.startswith("action-scores-"), media_folder.exists()) == (True, False)
    assert mine.is_file()  # a folder the user named is the user's
