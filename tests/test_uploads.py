"""A tracking outage during training: tables wait in the run's spool folder and reach a real
MLflow server once it is back, in order and once each; if it never comes back, the printed
`action-scores upload` command finishes the job. Resumed training replaces an epoch's table."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import BIN, _free_port, ROOT, in_process_training, run_command, start_server, stop_server
from tracking.analyze import analyze_run
from tracking.record.recorder import LossRecorder
from tracking.errors import ActionScoresError
from tracking.backends import MLflowTracker


class RestartableServer:
    """An `mlflow server` on a fixed port that a test can stop and start again on the same URI and stores."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()  # fixed for the test: a restart serves the same URI
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = start_server(self.root, self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process)
        self.process = None
        with socket.socket() as sock:  # refused from now on: the outage is real
            assert sock.connect_ex(("127.0.0.1", self.port)) != 0


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RestartableServer]:
    instance = RestartableServer(tmp_path)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture()
def spool_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's `$ACTION_SCORES_SPOOL`, in this process, outside any run a launcher set."""
    root = tmp_path / "spool"
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(root))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return root


def _env(server: RestartableServer, spool: Path, wait: float) -> dict[str, str]:
    """A training process that fails fast on each try (our uploader does the retrying) and waits `wait` s at its end."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri, PYTHONPATH=str(ROOT), ACTION_SCORES_SPOOL=str(spool),
               ACTION_SCORES_UPLOAD_WAIT=str(wait), ACTION_SCORES_UPLOAD_BACKOFF="1",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _train(env: dict[str, str], experiment: str, epochs: int) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "python"), "-m", "experiments.classify", "--epochs", str(epochs), "--track", "test",
         "--experiment", experiment], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(condition, what: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n{process.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _only_run(client: mlflow.MlflowClient, experiment: str) -> str | None:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return runs[0].info.run_id if runs else None


def _stop_once_the_run_exists(server: RestartableServer, experiment: str, process: subprocess.Popen) -> str:
    """Let training open its run and log its params, then take the server away (before epoch 0 ends)."""
    client = mlflow.MlflowClient(server.uri)
    _wait_for(lambda: _only_run(client, experiment) is not None and client.get_run(
        _only_run(client, experiment)).data.params.get("action_scores.dataset") == "digits", "the run", process)
    run_id = _only_run(client, experiment)
    # Hold training while the server goes away, so that every epoch it has not ended yet ends with the
    # server gone, however fast this machine is.
    process.send_signal(signal.SIGSTOP)
    try:
        server.stop()
    finally:
        process.send_signal(signal.SIGCONT)
    return run_id


def _assert_finished_with_nothing_left_behind(training: subprocess.Popen, out: str, err: str, run_id: str) -> None:
    """Training exited cleanly, its run finished, and no write was left for `action-scores upload`."""
    assert training.returncode == 0, err
    assert f"run {run_id} finished" in out
    assert "action-scores upload" not in err


def _spooled_tables(spool: Path) -> dict[str, bytes]:
    """The epoch tables in a spool folder now, by artifact path: what the server must get byte for byte."""
    return {path.relative_to(spool).as_posix(): path.read_bytes()
            for path in sorted(spool.glob("per_sample_losses/*/epoch_*.parquet"))}


def _assert_tables_arrived_whole_and_once(server: RestartableServer, run_id: str, spool: Path, epochs: int,
                                          tmp_path: Path, spooled: dict[str, bytes]) -> None:
    """Every epoch on the server once, those `spooled` during the outage byte for byte; then gone from the spool."""
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    names = [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert names == [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(epochs)]
    assert spooled and set(spooled) <= set(names)
    for name, content in spooled.items():
        downloaded = Path(client.download_artifacts(run_id, name, str(tmp_path / "down" / Path(name).stem)))
        assert downloaded.read_bytes() == content, name  # whole: byte for byte
    history = client.get_metric_history(run_id, "test_loss")
    assert sorted(m.step for m in history) == list(range(epochs))  # every epoch's metrics, none twice
    assert not list((spool / "pending").glob("*.json"))
    assert sorted(path.name for path in spool.rglob("*.parquet")) == []  # uploaded tables and media leave the spool


def test_server_stopped_mid_training_and_restarted_loses_nothing(server: RestartableServer, tmp_path: Path) -> None:
    epochs, experiment = 3, f"outage-{uuid.uuid4().hex[:8]}"
    spool_root = tmp_path / "spool"
    training = _train(_env(server, spool_root, wait=180), experiment, epochs)
    try:
        run_id = _stop_once_the_run_exists(server, experiment, training)
        spool = spool_root / f"mlflow-{run_id}"
        last = spool / f"per_sample_losses/test/epoch_{epochs - 1:04d}.parquet"
        _wait_for(last.exists, "the last epoch's table in the spool folder", training)
        spooled = _spooled_tables(spool)  # every epoch: written in order, none uploaded with the server away
        assert len(spooled) == epochs
        # Training reached its last epoch with the server down; its writes are queued on disk.
        pending = sorted((spool / "pending").glob("*.json"))
        assert len(pending) >= 2, pending  # at least the last epoch's table and metrics
        queued = [json.loads(f.read_text()) for f in pending]
        measured_at = {op["step"]: op["timestamp_ms"] for op in queued if op["kind"] == "metrics"}
        server.start()
        out, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
    _assert_finished_with_nothing_left_behind(training, out, err, run_id)
    _assert_tables_arrived_whole_and_once(server, run_id, spool, epochs, tmp_path, spooled)
    # Metrics queued in the outage carry the time they were measured, not the time they arrived.
    history = {m.step: m.timestamp for m in mlflow.MlflowClient(server.uri).get_metric_history(run_id, "test_loss")}
    assert measured_at and {step: history[step] for step in measured_at} == measured_at
    result = analyze_run(MLflowTracker(server.uri), run_id, panels=False)
    assert (result.status, result.samples, result.epochs) == ("done", {"test": 360}, {"test": epochs})


def test_server_that_never_comes_back_names_the_spool_and_the_command_that_uploads_later(
    server: RestartableServer, tmp_path: Path
) -> None:
    epochs, experiment = 2, f"gone-{uuid.uuid4().hex[:8]}"
    spool_root = tmp_path / "spool"
    env = _env(server, spool_root, wait=2)
    training = _train(env, experiment, epochs)
    try:
        run_id = _stop_once_the_run_exists(server, experiment, training)
        out, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
    spool = spool_root / f"mlflow-{run_id}"
    assert training.returncode == 0, err
    assert f"run {run_id} finished" in out
    assert f"They are kept in {spool}." in err
    # Epoch 0 may have reached the server before it went away; the last epoch cannot have.
    pending = sorted((spool / "pending").glob("*.json"))
    operations = [json.loads(f.read_text()) for f in pending]
    left = [f"{op['artifact_dir']}/{Path(op['path']).name}" for op in operations if op["kind"] == "artifact"]
    assert left[-1] == f"per_sample_losses/test/epoch_{epochs - 1:04d}.parquet"
    assert f"({len(left)} table(s): {', '.join(left)};" in err
    command = re.search(r"^\s+(action-scores upload .*)$", err, re.MULTILINE).group(1)
    assert command == f"action-scores upload --spool {spool} --tracking-uri {server.uri}"

    spooled = _spooled_tables(spool)
    assert sorted(spooled) == [name for name in left if name.startswith("per_sample_losses/")]  # the rest: uploaded
    server.start()
    client = mlflow.MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # the server never heard of the end
    on_server = [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")]
    tables_left = [path for path in left if path.startswith("per_sample_losses/")]  # beside the split's media
    assert sorted(on_server + tables_left) == [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(epochs)]
    uploaded = run_command(command.split(), env)
    # The tables left, their epochs' metrics (and any earlier metrics still queued), the end of the run.
    assert uploaded.stdout.splitlines()[-1] == f"run {run_id}: {len(pending)} pending write(s) done ({len(left)} table(s))"
    _assert_tables_arrived_whole_and_once(server, run_id, spool, epochs, tmp_path, spooled)
    again = run_command([*command.split(), "--run-id", run_id], env)
    assert again.stdout.strip() == f"run {run_id}: nothing left to upload in {spool}"
    wrong = run_command([*command.split(), "--run-id", "0" * 32], env, check=False)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == f"action-scores: error: {spool} belongs to run {run_id}, not {'0' * 32}"


def test_resumed_training_replaces_the_epochs_it_repeats(
    mlflow_server: str, tmp_path: Path, spool_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    first, resumed = rng.random((3, 6)).astype(np.float32), rng.random((3, 6)).astype(np.float32)

    def record(tracker: MLflowTracker, losses: np.ndarray, epochs: range) -> None:
        recorder = LossRecorder("test", num_samples=6, tracker=tracker)
        for epoch in epochs:
            recorder.update(torch.arange(6), torch.from_numpy(losses[epoch]))
            recorder.end_epoch(epoch)
            tracker.log_metrics({"test_loss": float(losses[epoch].mean())}, step=epoch)
        tracker.finish()

    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"resume-{uuid.uuid4().hex[:8]}")
    record(tracker, first, range(3))
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # as `mlflow run` or a user resuming a checkpoint does
    again = MLflowTracker(mlflow_server)
    assert again.start() == run_id
    record(again, resumed, range(1, 3))  # the checkpoint was after epoch 0: epochs 1 and 2 run again
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # end_run removes it too

    client = mlflow.MlflowClient(mlflow_server)
    names = [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert names == [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(3)]
    result = analyze_run(MLflowTracker(mlflow_server), run_id, panels=False)
    assert result.epochs == {"test": 3}
    table = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet", str(tmp_path / "s")))
    assert table["epochs"].tolist() == [3] * 6
    expected = first[0].astype(np.float64) + resumed[1] + resumed[2]
    assert table.sort_values("sample_id")["action"].tolist() == pytest.approx(expected.tolist(), rel=1e-12)
    # The repeated epochs' metrics are in the history as logged by each process: 3 + 2 values.
    assert sorted(m.step for m in client.get_metric_history(run_id, "test_loss")) == [0, 1, 1, 2, 2]


def test_writes_the_server_refuses_are_set_aside_and_the_rest_go_on(
    mlflow_server: str, tmp_path: Path, spool_root: Path
) -> None:
    client = mlflow.MlflowClient(mlflow_server)

    # A spooled table deleted before its upload: set aside; the metrics and table behind it arrive.
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"refused-{uuid.uuid4().hex[:8]}")
    gone, kept = tmp_path / "epoch_0000.parquet", tmp_path / "epoch_0001.parquet"
    kept.write_bytes(b"table 1")
    tracker.log_artifact(gone, "per_sample_losses/test")
    tracker.log_metrics({"test_loss": 0.5}, step=0)
    tracker.log_artifact(kept, "per_sample_losses/test")
    tracker.finish()
    spool = spool_root / f"mlflow-{run_id}"
    assert (spool / "failed" / "00000001.json").is_file()
    assert sorted((spool / "pending").glob("*.json")) == []
    assert f"refused 1 write(s) (per_sample_losses/test/epoch_0000.parquet: spooled table {gone} is gone)" in tracker.left_behind
    assert f"They are set aside in {spool / 'failed'}" in tracker.left_behind
    assert [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")] == \
        ["per_sample_losses/test/epoch_0001.parquet"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test_loss")] == [(0, 0.5)]
    assert client.get_run(run_id).info.status == "FINISHED"
    # Once the cause is fixed, `action-scores upload` takes the set-aside write too.
    gone.write_bytes(b"table 0")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    uploaded = run_command(["action-scores", "upload", "--spool", str(spool), "--tracking-uri", mlflow_server], env)
    assert uploaded.stdout.strip() == f"run {run_id}: 1 pending write(s) done (1 table(s))"
    assert [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")] == \
        [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(2)]

    # A run deleted on the server while training goes on: every write is refused at once, and
    # the end of the run says so instead of waiting out $ACTION_SCORES_UPLOAD_WAIT (300 s).
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"deleted-{uuid.uuid4().hex[:8]}")
    client.delete_run(run_id)
    tracker.log_metrics({"test_loss": 0.5}, step=0)
    started = time.monotonic()
    tracker.finish()
    assert time.monotonic() - started < 60
    assert "refused 2 write(s) (metrics of step 0: INVALID_PARAMETER_VALUE" in tracker.left_behind
    assert "end of run (FINISHED): INVALID_PARAMETER_VALUE" in tracker.left_behind
    assert sorted(f.name for f in (spool_root / f"mlflow-{run_id}" / "failed").iterdir()) == \
        ["00000001.json", "00000002.json"]


def test_resumed_process_sets_unreadable_leftovers_aside_and_ends_the_run_itself(
    mlflow_server: str, spool_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crashed process left: a truncated operation, its own end of run (FAILED), metrics."""
    client = mlflow.MlflowClient(mlflow_server)
    experiment_id = client.create_experiment(f"crashed-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    pending = spool_root / f"mlflow-{run_id}" / "pending"
    pending.mkdir(parents=True)
    (pending / "00000001.json").write_text('{"kind": "artifact", "pa')
    (pending / "00000002.json").write_text(json.dumps({"kind": "metrics", "metrics": {"test_loss": 0.25}, "step": 0}))
    (pending / "00000003.json").write_text(json.dumps({"kind": "end", "status": "FAILED"}))

    with in_process_training(mlflow_server):
        mlflow.set_experiment(experiment_id=experiment_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # resuming, as `mlflow run` does
        tracker = MLflowTracker(mlflow_server)
        assert tracker.start() == run_id
        tracker.log_metrics({"test_loss": 0.125}, step=1)
        _wait_for(lambda: len(client.get_metric_history(run_id, "test_loss")) == 2, "the new metrics")
        # The old process's end came before the new metrics in the queue: it must not have run.
        assert client.get_run(run_id).info.status == "RUNNING"
        tracker.finish()
    failed = spool_root / f"mlflow-{run_id}" / "failed"
    assert [f.name for f in failed.iterdir()] == ["00000001.json.unreadable"]
    assert (failed / "00000001.json.unreadable").read_text() == '{"kind": "artifact", "pa'  # kept as it was
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "test_loss")) == [(0, 0.25), (1, 0.125)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(pending.glob("*.json")) == []


def test_tables_written_off_the_training_thread_arrive_and_a_failed_write_is_named(
    mlflow_server: str, spool_root: Path
) -> None:
    """`end_epoch` checks the table in the caller's thread and leaves the writing to the tracker's writer
    thread; `finish` waits for it. A table the disk refuses is missing from the run, named at the end, and the
    epochs around it, the queued params and the run's end are unaffected."""
    client = mlflow.MlflowClient(mlflow_server)
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"write-behind-{uuid.uuid4().hex[:8]}")
    recorder = LossRecorder("test", num_samples=4, tracker=tracker)
    folder = spool_root / f"mlflow-{run_id}" / "per_sample_losses" / "test"
    (folder / "epoch_0001.parquet").mkdir(parents=True)  # a folder where epoch 1's table must go: the rename fails
    (folder / "epoch_0001.parquet" / "blocker").write_text("x")
    losses = np.arange(12, dtype=np.float32).reshape(3, 4)
    for epoch in range(3):
        recorder.update(torch.arange(4), torch.from_numpy(losses[epoch]))
        recorder.end_epoch(epoch)  # returns at once; epoch 1's failure happens on the writer thread
    tracker.log_params({"lr": 0.1})
    with pytest.raises(ActionScoresError, match=rf"run {run_id} ended FAILED: 1 table\(s\) could not be written "
                                                r"\(per_sample_losses/test/epoch_0001.parquet: IsADirectoryError"):
        tracker.finish()
    run = client.get_run(run_id)  # a run with a gap never ends FINISHED as though whole
    assert (run.info.status, run.data.params) == ("FAILED", {"lr": "0.1"})
    names = [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert names == ["per_sample_losses/test/epoch_0000.parquet", "per_sample_losses/test/epoch_0002.parquet"]
    for epoch in (0, 2):
        table = pd.read_parquet(client.download_artifacts(run_id, names[epoch // 2], str(spool_root / f"d{epoch}")))
        assert table["loss"].tolist() == losses[epoch].tolist()


def test_the_log_family_never_waits_for_a_server_that_is_away_and_the_write_family_raises(
    server: RestartableServer, spool_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One name per write: training's `log_params`, `log_metrics` and `log_artifact` return at once with the
    server gone and land, in order, once it is back (`finish` waits); the job's `write_metrics` raises at once."""
    for variable, value in {"ACTION_SCORES_UPLOAD_BACKOFF": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}.items():
        monkeypatch.setenv(variable, value)
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's own file")
    with in_process_training(server.uri):
        tracker = MLflowTracker(server.uri)
        run_id = tracker.start(experiment=f"away-{uuid.uuid4().hex[:8]}")
        server.stop()
        started = time.monotonic()
        tracker.log_params({"lr": 0.1})
        tracker.log_metrics({"test_loss": 0.5}, step=0)
        tracker.log_artifact(notes, "notes")
        assert time.monotonic() - started < 1
        with pytest.raises(Exception, match="failed with exception"):
            tracker.write_metrics({"test_loss": 0.25}, step=1)
        server.start()
        tracker.finish()
    assert tracker.left_behind == ""
    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert (run.info.status, run.data.params) == ("FINISHED", {"lr": "0.1"})
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "test_loss")] == [(0, 0.5)]
    assert [info.path for info in client.list_artifacts(run_id, "notes")] == ["notes/notes.txt"]
    assert notes.read_text() == "the user's own file"  # a file from outside the spool stays


def test_a_run_whose_writes_are_left_behind_stays_running_until_they_land(
    tracking_env: dict[str, str], client: mlflow.MlflowClient, spool_root: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """`finish` with writes still queued when its wait is up leaves the run RUNNING on the server, though the
    server answers: only the spooled `end`, after those writes, ends it (here by `action-scores upload`)."""
    monkeypatch.setenv("ACTION_SCORES_UPLOAD_WAIT", "0")  # the wait is up at once: the queue is left behind
    files = tmp_path / "files"
    files.mkdir()
    with in_process_training(tracking_env["MLFLOW_TRACKING_URI"]):
        tracker = MLflowTracker(tracking_env["MLFLOW_TRACKING_URI"])
        run_id = tracker.start(experiment=f"left-{uuid.uuid4().hex[:8]}")
        for index in range(40):
            path = files / f"file_{index:02d}.txt"
            path.write_text(str(index))
            tracker.log_artifact(path, "files")
        spool = tracker.spool_dir
        tracker.finish()
    assert "action-scores upload" in tracker.left_behind
    assert client.get_run(run_id).info.status == "RUNNING"  # was FINISHED with tables still to come
    run_command([str(BIN / "action-scores"), "upload", "--spool", str(spool)], tracking_env)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.list_artifacts(run_id, "files")) == 40
