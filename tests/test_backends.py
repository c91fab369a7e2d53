"""One suite for every backend: the same assertions against the session's real MLflow server and
real W&B offline runs (a new backend joins by its registry entry). Then what only MLflow has (its
param limits, the run a launcher opened), the registry and redaction."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest

from tracking.backends import TRACKERS, FanOutTracker, MLflowTracker, Tracker, WandbTracker, make_tracker, redact
from tracking.errors import ActionScoresError

BACKENDS = sorted(name for name, cls in TRACKERS.items() if cls is not FanOutTracker)  # "both" fans out to these
FILES = {  # artifact path -> bytes: nested folders, binary, non-ASCII, empty, one name in two splits
    "stuff/top.txt": b"top level\n",
    "stuff/a/one.bin": bytes(range(256)),
    "stuff/a/b/c/deep.txt": "d\u00e9j\u00e0 vu\n".encode(),
    "stuff/z/last.txt": b"",
    "per_sample_losses/train/epoch_0000.parquet": b"train table",
    "per_sample_losses/test/epoch_0000.parquet": b"test table",
}


@pytest.fixture(params=BACKENDS)
def new_tracker(request: pytest.FixtureRequest, mlflow_server: str, wandb_env: dict[str, str], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Tracker]]:
    """Makes trackers of one backend (MLflow: the session server; W&B: offline in tmp_path); every run they
    started is finished afterwards, and no MLFLOW_RUN_ID leaks in or out."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(tmp_path / "spool"))
    options = {MLflowTracker.name: {"tracking_uri": mlflow_server}}.get(request.param, {})
    made: list[Tracker] = []

    def make() -> Tracker:
        made.append(make_tracker(request.param, **options))
        return made[-1]

    yield make
    for tracker in made:
        tracker.finish()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _experiment() -> str:
    return f"backends-{uuid.uuid4().hex[:8]}"


def _write_files(root: Path) -> None:
    for relative, content in FILES.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)


def test_a_written_run_reads_back(new_tracker: Callable[[], Tracker], tmp_path: Path) -> None:
    writer = new_tracker()
    run_id = writer.start(experiment=_experiment(), run_name="written")
    assert writer.run_id == run_id
    writer.write_params({"lr": 0.1, "epochs": 3, "dataset": "digits"})
    for step, loss in enumerate([0.5, 0.25]):
        writer.write_metrics({"loss": loss}, step=step)
    writer.write_metrics({"final": 7.0})
    writer.set_tags({"action_scores.status": "running"})
    writer.set_tags({"action_scores.status": "done", "action_scores.owner": "me"})  # tags are mutable
    _write_files(tmp_path / "src")
    writer.write_artifacts(tmp_path / "src", "")
    replaced = tmp_path / "f.txt"
    replaced.write_text("first")
    writer.write_artifact(replaced, "d")
    replaced.write_text("second")
    writer.write_artifact(replaced, "d")  # a file of the same name is replaced
    writer.finish()

    reader = new_tracker()
    reader.attach(run_id)
    assert reader.run_id == run_id
    assert reader.params() == {"lr": "0.1", "epochs": "3", "dataset": "digits"}
    assert {k: v for k, v in reader.tags().items() if k.startswith("action_scores.")} == {
        "action_scores.status": "done", "action_scores.owner": "me"}
    assert reader.list_files("stuff") == sorted(p for p in FILES if p.startswith("stuff/"))
    assert reader.list_files("stuff/a") == ["stuff/a/b/c/deep.txt", "stuff/a/one.bin"]
    assert reader.list_files("per_sample_losses") == ["per_sample_losses/test/epoch_0000.parquet",
                                                      "per_sample_losses/train/epoch_0000.parquet"]
    assert reader.list_files("d") == ["d/f.txt"]
    assert reader.list_files("absent") == []
    for artifact_path, content in FILES.items():
        local = reader.download(artifact_path, tmp_path / "dst")
        assert local == tmp_path / "dst" / artifact_path  # dst_dir/<artifact_path>, as documented
        assert local.read_bytes() == content
    assert reader.download("d/f.txt", tmp_path / "dst").read_text() == "second"
    assert reader.artifact_uri("stuff/top.txt").endswith("stuff/top.txt")


def test_attach_to_an_unknown_run_is_a_clear_error_and_keeps_the_run(new_tracker: Callable[[], Tracker]) -> None:
    writer = new_tracker()
    run_id = writer.start(experiment=_experiment())
    writer.finish()
    reader = new_tracker()
    reader.attach(run_id)
    unknown = "0123456789abcdef0123456789abcdef"
    with pytest.raises(ActionScoresError, match=rf"run '{unknown}' not found"):
        reader.attach(unknown)
    assert reader.run_id == run_id  # a failed attach keeps the previous run
    with pytest.raises(ActionScoresError, match=r"no run: call start\(\) or attach\(\) first"):
        new_tracker().run_id


def test_find_runs_gives_the_finished_runs_newest_first(new_tracker: Callable[[], Tracker]) -> None:
    experiment = _experiment()
    started = []
    for failed in (False, False, True):
        tracker = new_tracker()
        started.append(tracker.start(experiment=experiment))
        tracker.finish(failed=failed)
        time.sleep(1.1)  # W&B offline folders are named to the second
    elsewhere = new_tracker()
    elsewhere.start(experiment=f"{experiment}-other")
    elsewhere.finish()

    reader = new_tracker()
    found = []
    for ref in reader.find_runs(experiment):  # what attach takes (W&B offline: the run's folder)
        reader.attach(ref)
        found.append(reader.run_id)
    assert found == [started[1], started[0]]


def test_non_blocking_writes_arrive_when_the_run_finishes(new_tracker: Callable[[], Tracker], tmp_path: Path) -> None:
    writer = new_tracker()
    run_id = writer.start(experiment=_experiment())
    table = tmp_path / "epoch_0000.parquet"
    table.write_bytes(bytes(range(200)) * 3)
    writer.log_artifact(table, "per_sample_losses/train")
    writer.log_metrics({"loss": 0.5}, step=0)
    writer.finish()
    assert not list((writer.spool_dir / "pending").glob("*"))  # nothing left behind to upload

    reader = new_tracker()
    reader.attach(run_id)
    assert reader.list_files("per_sample_losses") == ["per_sample_losses/train/epoch_0000.parquet"]
    local = reader.download("per_sample_losses/train/epoch_0000.parquet", tmp_path / "dst")
    assert local.read_bytes() == table.read_bytes()


# --- MLflow only ------------------------------------------------------------------------------
def _uploader_threads() -> set[str]:
    return {thread.name for thread in threading.enumerate() if thread.name.startswith("action-scores-")}


def test_a_new_run_closes_the_uploader_of_the_last_one_and_no_thread_outlives_finish(
    tracker: MLflowTracker, client: mlflow.MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(tmp_path / "spool"))
    before = _uploader_threads()
    experiment = _experiment()
    first = tracker.start(experiment=experiment)
    table = tmp_path / "epoch_0000.parquet"
    table.write_bytes(b"first run's table")
    tracker.log_artifact(table, "per_sample_losses/train")
    mlflow.end_run()  # the first run left open on the server, as a restart in one process leaves it
    second = tracker.start(experiment=experiment)
    tracker.log_artifact(table, "per_sample_losses/train")  # the second run's uploader replaces the first's
    assert not [t for t in threading.enumerate() if t.name.endswith(f"-mlflow-{first}")]
    assert [info.path for info in client.list_artifacts(first, "per_sample_losses/train")] == [
        "per_sample_losses/train/epoch_0000.parquet"]  # the first run's write was done before its uploader closed
    tracker.finish()
    assert _uploader_threads() == before
    assert client.get_run(second).info.status == "FINISHED"




@pytest.fixture()
def client(mlflow_server: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(mlflow_server)


@pytest.fixture()
def mlflow_run(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MLflowTracker]:
    """A started MLflow run in a fresh experiment; always finished, and no MLFLOW_RUN_ID leaks in or out."""
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


def test_log_params_many_and_long_values_are_accepted(mlflow_run: MLflowTracker, client: mlflow.MlflowClient) -> None:
    params = {f"p{i:03d}": i * 3 for i in range(250)}  # more than MLflow's 100 params per batch
    long_value = "".join(chr(ord("a") + i % 26) for i in range(7500))  # longer than MLflow's 6000 chars
    mlflow_run.write_params({**params, "long": long_value})
    stored = client.get_run(mlflow_run.run_id).data.params
    assert len(stored) == 251
    assert {key: stored[key] for key in params} == {key: str(value) for key, value in params.items()}
    assert stored["long"] == long_value[:6000]  # kept, cut to the backend's limit
    assert mlflow_run.params() == stored


def test_log_params_keeps_the_first_value_of_an_existing_key(mlflow_run: MLflowTracker, client: mlflow.MlflowClient) -> None:
    mlflow_run.write_params({"lr": 0.1, "epochs": 3})
    mlflow_run.write_params({"lr": "0.10", "batch": 64})  # reformatted value, as `mlflow run` may have logged
    assert client.get_run(mlflow_run.run_id).data.params == {"lr": "0.1", "epochs": "3", "batch": "64"}


def test_log_metrics_with_steps(mlflow_run: MLflowTracker, client: mlflow.MlflowClient) -> None:
    for step, value in enumerate([0.9, 0.5, 0.25]):
        mlflow_run.write_metrics({"loss": value, "acc": 1 - value}, step=step)
    mlflow_run.write_metrics({"final": 7})
    history = [(m.step, m.value) for m in client.get_metric_history(mlflow_run.run_id, "loss")]
    assert sorted(history) == [(0, 0.9), (1, 0.5), (2, 0.25)]
    acc = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.run_id, "acc"))
    assert [s for s, _ in acc] == [0, 1, 2]
    assert [v for _, v in acc] == pytest.approx([0.1, 0.5, 0.75])
    assert [(m.step, m.value) for m in client.get_metric_history(mlflow_run.run_id, "final")] == [(0, 7.0)]


def test_ui_url_opens_the_file_in_the_model_training_view(mlflow_run: MLflowTracker,
                                                           client: mlflow.MlflowClient) -> None:
    experiment_id = client.get_run(mlflow_run.run_id).info.experiment_id
    assert mlflow_run.ui_url("action_scores/test/loss/hardest.png") == (
        f"{mlflow_run.tracking_uri}/#/experiments/{experiment_id}/runs/{mlflow_run.run_id}"
        "/artifacts/action_scores/test/loss/hardest.png?workflowType=machine_learning")


def test_ui_url_is_none_without_a_server(tmp_path: Path) -> None:
    tracker = MLflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracker._run_id = "0" * 32  # no request is made for a URI without a UI
    assert tracker.ui_url("action_scores/test/loss/hardest.png") is None


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


def test_the_fan_out_tracker_refuses_to_attach_and_names_its_backends(mlflow_server: str, wandb_env: dict[str, str]) -> None:
    both = FanOutTracker([MLflowTracker(mlflow_server), WandbTracker()])
    with pytest.raises(ActionScoresError, match=r"^'both' writes to several backends; attach to one at a time: "
                                                r"'mlflow' or 'wandb'$"):
        both.attach("anything")
