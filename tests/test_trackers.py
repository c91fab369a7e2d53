"""MLflowTracker against the real session MLflow server, plus the registry and redaction."""

from __future__ import annotations



import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from tracking.errors import ActionScoresError
from tracking.backends import TRACKERS, MLflowTracker, make_tracker, redact


@pytest.fixture()
def client(mlflow_server: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(mlflow_server)


@pytest.fixture()
def tracker(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MLflowTracker]:
    """A started run in a fresh experiment; always finished, and no MLFLOW_RUN_ID leaks in or out."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracker = MLflowTracker(mlflow_server)
    tracker.start(experiment=f"trackers-{uuid.uuid4().hex[:8]}", run_name="t")
    try:
        yield tracker
    finally:
        tracker.finish()
        while mlflow.active_run() is not None:
            mlflow.end_run()


def test_unknown_tracker_name_lists_the_valid_ones() -> None:
    with pytest.raises(ActionScoresError, match=r"unknown tracker 'nope'; choose one of \[.*'mlflow'.*\]") as error:
        make_tracker("nope")
    assert str(sorted(TRACKERS)) in str(error.value)  # every registered name, sorted
    assert "nope" not in TRACKERS


def test_make_tracker_builds_an_mlflow_tracker(mlflow_server: str) -> None:
    tracker = make_tracker("mlflow", tracking_uri=mlflow_server)
    assert isinstance(tracker, MLflowTracker)
    assert tracker.tracking_uri == mlflow_server
    with pytest.raises(ActionScoresError, match=r"no run: call start\(\) or attach\(\) first"):
        tracker.run_id


def test_start_opens_a_run_in_the_experiment_and_finish_closes_it(
    mlflow_server: str, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    experiment = f"trackers-{uuid.uuid4().hex[:8]}"
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=experiment, run_name="named")
    try:
        assert tracker.run_id == run_id
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING"
        assert run.info.run_name == "named"
        assert run.info.experiment_id == client.get_experiment_by_name(experiment).experiment_id
    finally:
        tracker.finish(failed=True)
    assert client.get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_start_resumes_the_run_a_launcher_exported(
    mlflow_server: str, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment_id = client.create_experiment(f"launcher-{uuid.uuid4().hex[:8]}")
    launched = client.create_run(experiment_id).info.run_id
    # What `mlflow run` exports to the process it launches; monkeypatch removes them afterwards.
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    # A launched process starts with no active experiment; this one has the fluent API's
    # process-wide one left by earlier tests' start(), which mlflow checks against the run's.
    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment(experiment_id=experiment_id)
    tracker = MLflowTracker(mlflow_server)
    other = f"ignored-{uuid.uuid4().hex[:8]}"
    try:
        assert tracker.start(experiment=other, run_name="x") == launched
    finally:
        tracker.finish()
    assert client.get_run(launched).info.status == "FINISHED"
    assert client.get_experiment_by_name(other) is None  # the launcher's experiment is kept


def test_log_params_many_and_long_values_are_accepted(tracker: MLflowTracker, client: mlflow.MlflowClient) -> None:
    params = {f"p{i:03d}": i * 3 for i in range(250)}  # more than MLflow's 100 params per batch
    long_value = "".join(chr(ord("a") + i % 26) for i in range(7500))  # longer than MLflow's 6000 chars
    tracker.log_params({**params, "long": long_value})
    stored = client.get_run(tracker.run_id).data.params
    assert len(stored) == 251
    assert {key: stored[key] for key in params} == {key: str(value) for key, value in params.items()}
    assert stored["long"] == long_value[:6000]  # kept, cut to the backend's limit
    assert tracker.params() == stored


def test_log_params_keeps_the_first_value_of_an_existing_key(tracker: MLflowTracker, client: mlflow.MlflowClient) -> None:
    tracker.log_params({"lr": 0.1, "epochs": 3})
    tracker.log_params({"lr": "0.10", "batch": 64})  # reformatted value, as `mlflow run` may have logged
    assert client.get_run(tracker.run_id).data.params == {"lr": "0.1", "epochs": "3", "batch": "64"}


def test_log_metrics_with_steps(tracker: MLflowTracker, client: mlflow.MlflowClient) -> None:
    for step, value in enumerate([0.9, 0.5, 0.25]):
        tracker.log_metrics({"loss": value, "acc": 1 - value}, step=step)
    tracker.log_metrics({"final": 7})
    history = [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")]
    assert sorted(history) == [(0, 0.9), (1, 0.5), (2, 0.25)]
    acc = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "acc"))
    assert [s for s, _ in acc] == [0, 1, 2]
    assert [v for _, v in acc] == pytest.approx([0.1, 0.5, 0.75])
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "final")] == [(0, 7.0)]


def test_set_tags_and_read_them_back(tracker: MLflowTracker, client: mlflow.MlflowClient) -> None:
    tracker.set_tags({"action_scores.status": "done", "owner": "me"})
    tracker.set_tags({"owner": "you"})  # tags are mutable
    tags = tracker.tags()
    assert tags["action_scores.status"] == "done"
    assert tags["owner"] == "you"
    assert client.get_run(tracker.run_id).data.tags["owner"] == "you"


def test_artifacts_upload_list_recursively_and_download(tracker: MLflowTracker, tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = {
        "top.txt": b"top level\n",
        "a/one.bin": bytes(range(256)),
        "a/b/c/deep.txt": "d\u00e9j\u00e0 vu\n".encode(),
        "z/last.txt": b"",
    }
    for relative, content in files.items():
        path = source / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    tracker.log_artifacts(source, "stuff")
    tracker.log_artifact(source / "top.txt", "other/place")

    assert tracker.list_files("stuff") == sorted(f"stuff/{relative}" for relative in files)
    assert tracker.list_files("stuff/a") == ["stuff/a/b/c/deep.txt", "stuff/a/one.bin"]
    assert tracker.list_files("other") == ["other/place/top.txt"]
    assert tracker.list_files("absent") == []

    for relative, content in files.items():
        local = tracker.download(f"stuff/{relative}", tmp_path / "dst")
        assert local == tmp_path / "dst" / "stuff" / relative  # dst_dir/<artifact_path>, as documented
        assert local.read_bytes() == content
    assert tracker.artifact_uri("stuff/top.txt").endswith(f"{tracker.run_id}/artifacts/stuff/top.txt")


def test_download_keeps_the_artifact_path_under_dst(tracker: MLflowTracker, tmp_path: Path) -> None:
    for split in ("train", "test"):
        path = tmp_path / split / "epoch_0000.parquet"
        path.parent.mkdir()
        path.write_text(split)
        tracker.log_artifact(path, f"per_sample_losses/{split}")
    dst = tmp_path / "dst"
    train = tracker.download("per_sample_losses/train/epoch_0000.parquet", dst)
    test = tracker.download("per_sample_losses/test/epoch_0000.parquet", dst)
    assert train == dst / "per_sample_losses" / "train" / "epoch_0000.parquet"
    assert test == dst / "per_sample_losses" / "test" / "epoch_0000.parquet"
    assert (train.read_text(), test.read_text()) == ("train", "test")


def test_log_artifact_replaces_a_file_of_the_same_name(tracker: MLflowTracker, tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("first")
    tracker.log_artifact(path, "d")
    path.write_text("second")
    tracker.log_artifact(path, "d")
    assert tracker.list_files("d") == ["d/f.txt"]
    assert tracker.download("d/f.txt", tmp_path / "dst").read_text() == "second"


def test_attach_to_an_existing_and_an_unknown_run(tracker: MLflowTracker, mlflow_server: str) -> None:
    tracker.set_tags({"mark": "here"})
    other = MLflowTracker(mlflow_server)
    other.attach(tracker.run_id)
    assert other.run_id == tracker.run_id
    assert other.tags()["mark"] == "here"

    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(ActionScoresError, match=rf"run '{unknown}' not found at tracking URI {mlflow_server}"):
        other.attach(unknown)
    assert other.run_id == tracker.run_id  # a failed attach keeps the previous run


def test_find_runs_returns_only_finished_runs_newest_first(
    mlflow_server: str, client: mlflow.MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    experiment = f"find-{uuid.uuid4().hex[:8]}"
    experiment_id = client.create_experiment(experiment)
    other_experiment_id = client.create_experiment(f"{experiment}-other")

    now = int(time.time() * 1000)
    older = client.create_run(experiment_id, start_time=now - 20_000, run_name="older")
    client.set_terminated(older.info.run_id, "FINISHED")
    newer = client.create_run(experiment_id, start_time=now - 10_000, run_name="newer")
    client.set_terminated(newer.info.run_id, "FINISHED")
    failed = client.create_run(experiment_id, run_name="failed")
    client.set_terminated(failed.info.run_id, "FAILED")
    client.create_run(experiment_id, run_name="running")  # left RUNNING
    elsewhere = client.create_run(other_experiment_id)
    client.set_terminated(elsewhere.info.run_id, "FINISHED")

    tracker = MLflowTracker(mlflow_server)
    newest = tracker.start(experiment=experiment, run_name="tracked")
    tracker.finish()
    assert client.get_run(newest).info.status == "FINISHED"

    assert tracker.find_runs(experiment) == [newest, newer.info.run_id, older.info.run_id]
    assert tracker.find_runs(f"{experiment}-other") == [elsewhere.info.run_id]


def test_find_runs_of_an_unknown_experiment_is_a_clear_error(mlflow_server: str) -> None:
    tracker = MLflowTracker(mlflow_server)
    with pytest.raises(ActionScoresError, match=rf"no experiment named 'no-such-experiment-x1' at tracking URI {mlflow_server}"):
        tracker.find_runs("no-such-experiment-x1")


def test_redact_hides_credentials() -> None:
    assert redact("http://user:pw@host") == "http://***@host"
    assert redact("https://user:s3cret@tracking.example.com:5000/path?x=1") == "https://***@tracking.example.com:5000/path?x=1"
    assert redact("https://token@host/a@b") == "https://***@host/a@b"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"


def test_redact_hides_a_password_containing_at() -> None:
    redacted = redact("http://user:p@ss@host:5000")
    assert "ss" not in redacted.replace("host", "")
    assert redacted == "http://***@host:5000"
