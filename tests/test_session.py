"""`tracking.integrations.session`, the seam every callback stands on, without a framework: which run a
`tracker=` means, what reaches the run and when, and who ends it. Against the test session's real MLflow
server and real W&B offline runs."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import wandb

from tests.conftest import in_process_training
from tracking.backends import MLflowTracker
from tracking.backends.wandb_backend import OfflineRun
from tracking.errors import ActionScoresError
from tracking.integrations.session import (RecordedRun, RecordingSession, check_media, check_sample_ids, join_wandb,
                                           open_run)

SAMPLES = 6


def _epoch(session: RecordingSession, split: str, epoch: int) -> np.ndarray:
    losses = torch.arange(SAMPLES, dtype=torch.float32) + 10 * epoch
    session.recorder(split, SAMPLES).update(torch.arange(SAMPLES), losses)
    session.end_epoch(split, epoch)
    return losses.numpy()


def test_params_and_media_reach_the_run_after_the_first_table_and_the_session_ends_what_it_opened(
        mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    tracker = MLflowTracker(mlflow_server)
    writer, finish = open_run(tracker, f"session-{uuid.uuid4().hex[:8]}")
    assert writer is tracker and finish  # unstarted: started here, so ended here
    session = RecordingSession(writer, {"test": "eval"}, {"test": {"texts": [f"s{i}" for i in range(SAMPLES)]}})
    session.recorder("test", SAMPLES)
    run_id = writer.run_id
    assert client.list_artifacts(run_id) == []  # media encoded, not sent: nothing before a table has passed
    assert "action_scores.scored_by.test" not in client.get_run(run_id).data.params
    expected = [_epoch(session, "test", epoch) for epoch in range(2)]
    with pytest.raises(ActionScoresError, match=r"split 'test' had 6 samples, now 7"):
        session.recorder("test", SAMPLES + 1)
    session.close()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["action_scores.scored_by.test"] == "eval"
    for epoch, losses in enumerate(expected):
        path = client.download_artifacts(run_id, f"per_sample_losses/test/epoch_{epoch:04d}.parquet", str(tmp_path))
        np.testing.assert_array_equal(pd.read_parquet(path)["loss"].to_numpy(), losses)
    media = pd.read_parquet(client.download_artifacts(run_id, "per_sample_media/test/media.parquet", str(tmp_path)))
    assert media["text"].tolist() == [f"s{i}" for i in range(SAMPLES)]
    assert RecordedRun.of(writer) == RecordedRun("mlflow", run_id, run_id)


def test_a_started_tracker_and_an_active_run_are_joined_and_left_open(
        mlflow_server: str, client: mlflow.MlflowClient) -> None:
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(f"session-{uuid.uuid4().hex[:8]}")
    writer, finish = open_run(tracker, None)
    assert writer is tracker and not finish  # its owner ends it
    session = RecordingSession(writer, {"test": "eval"}, {}, finish_writer=finish)
    _epoch(session, "test", 0)
    session.close()
    assert client.get_run(run_id).info.status == "RUNNING"
    tracker.finish()
    assert [f.path for f in client.list_artifacts(run_id, "per_sample_losses/test")] == [
        "per_sample_losses/test/epoch_0000.parquet"]

    experiment = client.create_experiment(f"session-active-{uuid.uuid4().hex[:8]}")
    with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as active:
        joined, finish = open_run("mlflow", None)
        assert joined.run_id == active.info.run_id and finish
        session = RecordingSession(joined, {"test": "eval"}, {}, finish)
        _epoch(session, "test", 0)
        session.close()  # waits for the table; the run stays its owner's
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
        assert len(client.list_artifacts(active.info.run_id, "per_sample_losses/test")) == 1


def test_a_joined_wandb_run_has_every_table_when_the_session_closes_and_no_thread_outlives_it(
        wandb_env: dict[str, str]) -> None:
    run = wandb.init(project=wandb_env["WANDB_PROJECT"], mode="offline")
    writer = join_wandb(run)
    session = RecordingSession(writer, {"test": "eval"}, {})
    expected = [_epoch(session, "test", epoch) for epoch in range(3)]
    session.close()
    assert [t.name for t in threading.enumerate() if t.name.endswith(f"-wandb-{run.id}")] == []
    folder = Path(run.dir).parent
    run.finish()  # its owner ends it: only now is the exit record written
    files = OfflineRun(folder).files("per_sample_losses/test")
    assert sorted(files) == [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(3)]
    for (_, path), losses in zip(sorted(files.items()), expected):
        np.testing.assert_array_equal(pd.read_parquet(path)["loss"].to_numpy(), losses)


def test_media_and_ids_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ActionScoresError, match=r"media given for splits \['val'\] that are not tracked; tracked: "
                                                r"\['test'\]"):
        check_media({"val": {"images": []}}, ["test"])
    with pytest.raises(ActionScoresError, match=r"media\['test'\]: unknown keys \['pictures'\]"):
        check_media({"test": {"pictures": []}}, ["test"])
    assert check_media(None, ["test"]) == {}
    check_sample_ids("test", np.array([2, 0, 1]), 3)  # any order
    with pytest.raises(ActionScoresError, match=r"appear more than once"):
        check_sample_ids("test", np.array([0, 1, 1]), 3)
