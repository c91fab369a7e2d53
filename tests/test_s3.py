"""MLflow servers whose artifacts live in S3 (a local moto server, see `S3_MODES` in conftest), in both modes:
proxied (`--artifacts-destination s3://...`: the server reads and writes the bucket) and direct
(`--no-serve-artifacts --default-artifact-root s3://...`: the client does, with the standard AWS variables).

In each mode: the recorder's background uploads land whole in the bucket; the bucket going off the network
during training is spooled and made good once it is back; the post-hoc job scores the run and logs its
panels into the bucket; the job lock holds. The (dummy) AWS secret shows up in no param, tag, artifact,
output or log. A direct-mode client without boto3 is told what to install instead of retrying.

This module's `mlflow_server` is the S3 one, so the lock and resumed-training tests imported below from
test_job_lock.py and test_uploads.py run here again, unchanged, against each mode.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import BIN, S3MlflowServer, run_command, snapshot_run
from tests.test_job_lock import test_a_job_killed_halfway_leaves_no_done_and_the_next_job_finishes_the_work  # noqa: F401
from tests.test_job_lock import test_two_jobs_at_once_do_the_work_once  # noqa: F401
from tests.test_uploads import (  # noqa: F401 (spool_root: the fixture of the imported test)
    _assert_finished_with_nothing_left_behind, _assert_tables_arrived_whole_and_once, _env, _only_run, _spooled_tables,
    _train, _wait_for, spool_root,
    test_resumed_training_replaces_the_epochs_it_repeats,
)
from tracking.backends import MLflowTracker
from tracking.record.recorder import LossRecorder


@pytest.fixture(scope="session")
def mlflow_server(s3_mlflow_server: S3MlflowServer) -> str:
    """Every fixture of conftest built on the session server (client, tracker, tracking_env) gets the S3 one."""
    return s3_mlflow_server.uri


@pytest.fixture(autouse=True)
def s3(s3_mlflow_server: S3MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3MlflowServer]:
    """The store's AWS variables in this process, hence in every subprocess a test starts from its environment."""
    for key, value in s3_mlflow_server.store.env.items():
        monkeypatch.setenv(key, value)
    yield s3_mlflow_server


def _objects(server: S3MlflowServer, run_id: str, behind_the_relay: bool = False) -> dict[str, bytes]:
    """What the bucket holds of a run, read with boto3 (not through MLflow): artifact path -> bytes."""
    client, marker = server.store.client(behind_the_relay), f"/{run_id}/artifacts/"
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=server.store.bucket, Prefix=f"{server.mode}/"):
        for entry in page.get("Contents", []):
            if marker in entry["Key"]:
                body = client.get_object(Bucket=server.store.bucket, Key=entry["Key"])["Body"].read()
                found[entry["Key"].split(marker, 1)[1]] = body
    return found


def _queued(spool: Path) -> list[str]:
    """The operation files waiting in a spool folder (one may be done and gone while this reads)."""
    found = []
    for path in sorted((spool / "pending").glob("*.json")):
        try:
            found.append(path.read_text())
        except FileNotFoundError:
            pass
    return found


def _assert_secret_nowhere(server: S3MlflowServer, run_id: str, outputs: list[str], spool: Path) -> None:
    """The AWS secret is in no param, tag or metric of the run, no byte of its artifacts (read from the bucket),
    no captured output, not in the tracking server's log and not in the spool folder."""
    secret = server.store.secret
    snapshot = snapshot_run(mlflow.MlflowClient(server.uri), run_id)
    assert secret not in repr({key: value for key, value in snapshot.items() if key != "files"})
    objects = _objects(server, run_id)
    assert objects and not [path for path, body in objects.items() if secret.encode() in body]
    assert not [output for output in outputs if secret in output]
    assert secret.encode() not in (server.root / "server.log").read_bytes()
    assert not [path for path in spool.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]


def test_recorded_tables_land_whole_in_the_bucket_and_the_job_scores_them_there(
    s3: S3MlflowServer, tracking_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    n, epochs = 40, 3
    spool_root = tmp_path / "spool"
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(spool_root))
    rng = np.random.default_rng(7)
    losses = (rng.random((epochs, n)) * 2).astype(np.float32)
    targets = rng.integers(0, 4, size=n)
    tracker = MLflowTracker(s3.uri, keep_local=True)  # the spool keeps its tables, for the bucket's to match
    run_id = tracker.start(experiment=f"s3-{s3.mode}-{uuid.uuid4().hex[:8]}")
    recorder = LossRecorder("test", num_samples=n, tracker=tracker)
    recorder.record_media(np.arange(n), images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
                          labels=[f"class {t}" for t in targets])
    for epoch in range(epochs):
        order = rng.permutation(n)  # batches in any order, two per epoch
        for half in np.array_split(order, 2):
            recorder.update(torch.from_numpy(half), torch.from_numpy(losses[epoch, half]),
                            target=torch.from_numpy(targets[half]))
        recorder.end_epoch(epoch)
    tracker.finish()
    assert tracker.left_behind == ""
    spool = spool_root / f"mlflow-{run_id}"
    recorded = {path.relative_to(spool).as_posix(): path.read_bytes()
                for path in spool.rglob("*.parquet")}
    assert sorted(recorded) == ["per_sample_losses/test/epoch_0000.parquet", "per_sample_losses/test/epoch_0001.parquet",
                                "per_sample_losses/test/epoch_0002.parquet", "per_sample_media/test/media.parquet"]
    assert _objects(s3, run_id) == recorded  # in the bucket itself, byte for byte

    analysed = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id, "--top-k", "5"], tracking_env)
    assert f"run {run_id}: done (test: {n} samples x {epochs} epochs)" in analysed.stdout
    objects = _objects(s3, run_id)
    (tmp_path / "scores.parquet").write_bytes(objects["action_scores/test/scores.parquet"])
    scores = pq.read_table(tmp_path / "scores.parquet").to_pandas().sort_values("sample_id")
    expected = losses.astype(np.float64).sum(axis=0)
    assert scores["sample_id"].tolist() == list(range(n))
    assert scores["action"].to_numpy() == pytest.approx(expected, rel=1e-12)
    assert scores["rank"].tolist() == (np.lexsort((np.arange(n), -expected)).argsort() + 1).tolist()
    assert scores["label"].tolist() == targets.tolist()
    for panel in ("hardest.png", "easiest.png"):
        assert objects[f"action_scores/test/loss/{panel}"].startswith(b"\x89PNG")
    assert mlflow.MlflowClient(s3.uri).get_run(run_id).data.tags["action_scores.status"] == "done"
    captured = capfd.readouterr()
    _assert_secret_nowhere(s3, run_id, [analysed.stdout, analysed.stderr, captured.out, captured.err], spool)


def test_the_bucket_gone_mid_training_loses_nothing(s3: S3MlflowServer, tmp_path: Path) -> None:
    epochs, experiment = 2, f"s3-outage-{s3.mode}-{uuid.uuid4().hex[:8]}"
    spool_root = tmp_path / "spool"
    client = mlflow.MlflowClient(s3.uri)
    training = _train(_env(s3, spool_root, wait=180), experiment, epochs)
    try:
        _wait_for(lambda: _only_run(client, experiment) is not None and client.get_run(
            _only_run(client, experiment)).data.params.get("action_scores.dataset") == "digits", "the run", training, timeout=600)
        run_id = _only_run(client, experiment)
        spool = spool_root / f"mlflow-{run_id}"
        last = spool / f"per_sample_losses/test/epoch_{epochs - 1:04d}.parquet"
        training.send_signal(signal.SIGSTOP)  # every epoch not yet ended ends with the bucket gone
        try:
            with s3.store.unreachable():
                training.send_signal(signal.SIGCONT)
                # Training reaches its last epoch without the bucket: that table waits on disk, queued.
                _wait_for(lambda: any(last.name in operation for operation in _queued(spool)),
                          "the last epoch's table queued in the spool folder", training, timeout=600)
                assert last.is_file()
                assert f"per_sample_losses/test/{last.name}" not in _objects(s3, run_id, behind_the_relay=True)
                spooled = _spooled_tables(spool)
        finally:
            training.send_signal(signal.SIGCONT)
        out, err = training.communicate(timeout=300)
    finally:
        if training.poll() is None:
            training.kill()
    _assert_finished_with_nothing_left_behind(training, out, err, run_id)
    assert "retrying" in err  # the uploader did meet the outage
    assert len(spooled) == epochs  # every epoch waited for the bucket
    _assert_tables_arrived_whole_and_once(s3, run_id, spool, epochs, tmp_path, spooled)
    objects = _objects(s3, run_id)
    assert {path: objects[path] for path in objects if path.startswith("per_sample_losses/")} == spooled
    _assert_secret_nowhere(s3, run_id, [out, err], spool)



def test_a_client_without_boto3_is_told_what_to_install_instead_of_retrying(
    s3: S3MlflowServer, tmp_path: Path
) -> None:
    """Direct mode only: there the training process itself writes to S3."""
    if s3.mode != "direct":
        pytest.skip("proxied: the server writes the bucket; the client needs no boto3")
    script = (  # boto3 as if not installed: importing it fails
        "import sys; sys.modules['boto3'] = None\n"
        "import numpy as np, torch\n"
        "from tracking.backends import MLflowTracker\n"
        "from tracking.record.recorder import LossRecorder\n"
        f"tracker = MLflowTracker({s3.uri!r}); run_id = tracker.start(experiment='s3-no-boto3')\n"
        "recorder = LossRecorder('test', 4, tracker)\n"
        "recorder.update(torch.arange(4), torch.rand(4)); recorder.end_epoch(0)\n"
        "tracker.finish(); print(run_id)\n"
    )
    env = dict(_env(s3, tmp_path / "spool", wait=120))
    started = time.monotonic()
    result = run_command([str(BIN / "python"), "-c", script], env)
    assert time.monotonic() - started < 100  # refused at once, not retried until the wait ends
    run_id = result.stdout.split()[-1]
    assert ("refused 1 write(s) (per_sample_losses/test/epoch_0000.parquet: import of boto3 halted; None in "
            "sys.modules: the run's artifact store needs it in the training environment (for s3://: pip install "
            "'action-scores[s3]'))") in result.stderr
    assert (tmp_path / "spool" / f"mlflow-{run_id}" / "failed" / "00000001.json").is_file()
    assert mlflow.MlflowClient(s3.uri).get_run(run_id).info.status == "FINISHED"  # the rest went on


def test_a_bucket_that_does_not_exist_is_refused_at_once_instead_of_retried(
    s3: S3MlflowServer, spool_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct mode only: S3's own "NoSuchBucket" reaches the training process, which sets the write aside (as
    for an MLflow refusal) rather than retrying it until the end of training's wait."""
    if s3.mode != "direct":
        pytest.skip("proxied: the server writes the bucket, and the client sees a server error")
    monkeypatch.setenv("ACTION_SCORES_UPLOAD_WAIT", "120")
    experiment = f"s3-missing-bucket-{uuid.uuid4().hex[:8]}"
    mlflow.MlflowClient(s3.uri).create_experiment(experiment, artifact_location=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    tracker = MLflowTracker(s3.uri)
    run_id = tracker.start(experiment=experiment)
    recorder = LossRecorder("test", 4, tracker)
    recorder.update(torch.arange(4), torch.rand(4))
    recorder.end_epoch(0)
    tracker.log_metrics({"test_loss": 0.5}, step=0)
    started = time.monotonic()
    tracker.finish()
    assert time.monotonic() - started < 60
    assert "refused 1 write(s) (per_sample_losses/test/epoch_0000.parquet: S3 refused it (NoSuchBucket)" in \
        tracker.left_behind
    (set_aside,) = (spool_root / f"mlflow-{run_id}" / "failed").glob("*.json")  # the table's; its number depends on
    assert json.loads(set_aside.read_text())["kind"] == "artifact"                # when the writer thread queued it
    run = mlflow.MlflowClient(s3.uri).get_run(run_id)
    assert (run.info.status, run.data.metrics) == ("FINISHED", {"test_loss": 0.5})  # the rest went on
