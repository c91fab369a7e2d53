"""`RunWriter.log_table` on every backend, `--tracker both` included: the table is made off the training
thread and reaches each run; a table that cannot be made ends the run failed and `finish` says which."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from tracking.backends import FanOutTracker, MLflowTracker, Tracker, WandbTracker
from tracking.backends.wandb_backend import OfflineRun
from tracking.errors import ActionScoresError

TABLE = "per_sample_losses/train"


@pytest.fixture(params=["mlflow", "wandb", "both"])
def writer(request: pytest.FixtureRequest, mlflow_server: str, wandb_env: dict[str, str], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Tracker:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(tmp_path / "spool"))
    made = {"mlflow": lambda: MLflowTracker(mlflow_server), "wandb": WandbTracker,
            "both": lambda: FanOutTracker([MLflowTracker(mlflow_server), WandbTracker()])}
    tracker = made[request.param]()
    tracker.start(experiment=f"fanout-{uuid.uuid4().hex[:8]}")
    yield tracker
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _members(tracker: Tracker) -> list[Tracker]:
    return tracker.trackers if isinstance(tracker, FanOutTracker) else [tracker]


def _reader(member: Tracker) -> Tracker:
    """A fresh tracker of the member's backend, attached to the member's run."""
    reader = MLflowTracker(member.tracking_uri) if isinstance(member, MLflowTracker) else WandbTracker()
    reader.attach(member.run_id)  # W&B offline: its folder, found by the bare id
    return reader


def _ended_failed(member: Tracker, folder: Path | None) -> bool:
    if isinstance(member, MLflowTracker):
        return mlflow.MlflowClient(member.tracking_uri).get_run(member.run_id).info.status == "FAILED"
    return not OfflineRun(folder).finished


def _writing(path: Path, content: bytes, threads: list[str]) -> Callable[[], None]:
    def write() -> None:
        threads.append(threading.current_thread().name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return write


def test_a_table_is_made_off_the_training_thread_and_reaches_every_backend(writer: Tracker, tmp_path: Path) -> None:
    threads: list[str] = []
    path = writer.spool_dir / TABLE / "epoch_0000.parquet"
    writer.log_table(path, _writing(path, bytes(range(256)), threads), TABLE)
    writer.finish()
    assert threads == [f"action-scores-write-{writer.spool_dir.name}"]
    # Gone from the spool once the run has it; `both` keeps it: MLflow's queue read it from there, later.
    assert path.exists() is isinstance(writer, FanOutTracker)
    for member in _members(writer):
        reader = _reader(member)
        assert reader.list_files("per_sample_losses") == [f"{TABLE}/epoch_0000.parquet"]
        local = reader.download(f"{TABLE}/epoch_0000.parquet", tmp_path / member.name)
        assert local.read_bytes() == bytes(range(256))
        reader.finish()


def test_a_table_that_cannot_be_made_ends_the_run_failed_and_finish_names_it(writer: Tracker) -> None:
    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    writer.log_table(writer.spool_dir / TABLE / "epoch_0001.parquet", disk_full, TABLE)
    folders = [getattr(member, "offline_folder", None) for member in _members(writer)]
    with pytest.raises(ActionScoresError, match=rf"^run {writer.run_id} ended FAILED: 1 table\(s\) could not be "
                                                rf"written \({TABLE}/epoch_0001.parquet: OSError: \[Errno 28\] No "
                                                r"space left on device\); record those epochs again"):
        writer.finish()
    assert all(_ended_failed(member, folder) for member, folder in zip(_members(writer), folders))
