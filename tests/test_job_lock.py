"""Two `action-scores analyze` processes on one run, a job killed halfway, a lock left by a dead job:
real processes against the real MLflow server; the run is never corrupted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pytest

from tests.conftest import BIN, ROOT, run_command, snapshot_run
from tests.test_analyze import _check_scores, _make_run, _make_wandb_run, _metric_lengths, _random_epochs, _scores
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker, WandbTracker
from tracking.errors import ActionScoresError

LOCK = "action_scores.lock"
METRICS = ("samples", "epochs", "action_mean", "action_max", "action_min")


def _analyze(run_id: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "action-scores"), "analyze", "--run-id", run_id, "--no-panels"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def test_two_jobs_at_once_do_the_work_once(
    client: mlflow.MlflowClient, experiment_id: str, tracking_env: dict[str, str], tmp_path: Path
) -> None:
    files, losses, targets = _random_epochs(seed=31, n=500, epochs=20)
    run_id = _make_run(client, experiment_id, tmp_path, files)
    jobs = [_analyze(run_id, tracking_env) for _ in range(2)]
    outcomes = []
    for job in jobs:
        out, err = job.communicate(timeout=300)
        outcomes.append((job.returncode, out.strip().splitlines()[-1] if out.strip() else "", err.strip()))
    done = [o for o in outcomes if o[0] == 0 and o[1].startswith(f"run {run_id}: done (test: 500 samples x 20 epochs)")]
    assert len(done) == 1, outcomes
    (other,) = [o for o in outcomes if o not in done]
    # The other job either found the lock, lost the race for it, or came after the first had finished.
    assert (other[0] == 2 and other[2].startswith(f"action-scores: error: run {run_id}")
            and ("is being analysed by another job" in other[2] or "another job took it at the same moment" in other[2])
            ) or other[:2] == (0, f"run {run_id}: skipped - already analysed (use force to redo)"), outcomes
    assert _metric_lengths(client, run_id) == {f"action_scores.test.{m}": 1 for m in METRICS}  # written once
    tags = client.get_run(run_id).data.tags
    assert tags["action_scores.status"] == "done" and LOCK not in tags
    _check_scores(_scores(client, run_id, "test", tmp_path / "s"), losses, targets)


def test_a_live_job_holding_the_run_is_named_and_the_run_left_unchanged(
    client: mlflow.MlflowClient, experiment_id: str, tracking_env: dict[str, str], tmp_path: Path
) -> None:
    files, _, _ = _random_epochs(seed=32, n=8, epochs=2)
    run_id = _make_run(client, experiment_id, tmp_path, files)
    holder = f"{socket.gethostname()}:{os.getpid()}:feedbeef {_now()}"  # this test process: alive
    client.set_tag(run_id, LOCK, holder)
    before = snapshot_run(client, run_id)
    result = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id, "--no-panels"],
                         tracking_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        f"action-scores: error: run {run_id} is being analysed by another job ({LOCK} = {holder!r}); "
        "try again when it has finished."
    )
    assert snapshot_run(client, run_id) == before


def test_a_job_killed_halfway_leaves_no_done_and_the_next_job_finishes_the_work(
    client: mlflow.MlflowClient, experiment_id: str, tracking_env: dict[str, str], tmp_path: Path
) -> None:
    files, losses, targets = _random_epochs(seed=33, n=2000, epochs=40)
    run_id = _make_run(client, experiment_id, tmp_path, files)
    job = _analyze(run_id, tracking_env)
    deadline = time.monotonic() + 120
    while LOCK not in client.get_run(run_id).data.tags:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)  # mid-work: it holds the run and is downloading 40 tables
    job.wait()
    tags = client.get_run(run_id).data.tags
    assert "action_scores.status" not in tags
    assert tags[LOCK].startswith(f"{socket.gethostname()}:{job.pid}:")  # left behind by the dead job

    result = analyze_run(MLflowTracker(client.tracking_uri), run_id, panels=False)  # its process is gone: stale
    assert (result.status, result.epochs) == ("done", {"test": 40})
    tags = client.get_run(run_id).data.tags
    assert tags["action_scores.status"] == "done" and LOCK not in tags
    _check_scores(_scores(client, run_id, "test", tmp_path / "s"), losses, targets)


def test_a_lock_older_than_the_ttl_is_taken_over(
    client: mlflow.MlflowClient, experiment_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files, _, _ = _random_epochs(seed=34, n=8, epochs=2)
    run_id = _make_run(client, experiment_id, tmp_path, files)
    client.set_tag(run_id, LOCK, "elsewhere:123:cafe 2020-01-01T00:00:00+00:00")  # another host: only age tells
    monkeypatch.setenv("ACTION_SCORES_LOCK_TTL", "3600")
    assert analyze_run(MLflowTracker(client.tracking_uri), run_id, panels=False).status == "done"
    assert LOCK not in client.get_run(run_id).data.tags


def test_a_wandb_offline_run_held_by_a_job_is_refused_to_a_second_and_freed_when_the_first_dies(
        wandb_env: dict[str, str], tmp_path: Path) -> None:
    folder = _make_wandb_run(tmp_path, _random_epochs(seed=5, n=50, epochs=2)[0])
    run_id = folder.name.rsplit("-", 1)[1]
    lock = folder.parent / f".action-scores-{run_id}.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from tracking.backends.lock import file_lock\n"
                               f"with file_lock({run_id!r}, Path({str(lock)!r})):\n    print('held', flush=True); "
                               "time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ActionScoresError, match=rf"^run {run_id} is being analysed by another job \(\S+:{holder.pid} "):
        analyze_run(WandbTracker(), str(folder), panels=False)
    assert len(list(folder.parent.glob(f"offline-run-*-{run_id}"))) == 1  # not resumed: nothing written
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert analyze_run(WandbTracker(), str(folder), panels=False).status == "done"
