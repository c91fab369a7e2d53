"""A tracking server that is away: every process of ours gives up within seconds and says why.

MLflow's own client would retry each request for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, backoff
factor 2); `MLflowTracker` bounds that (`HTTP_BOUNDS`) unless the user set the variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tracking.backends import MLflowTracker
from tracking.backends.mlflow_backend import HTTP_BOUNDS
from tracking.errors import ActionScoresError

# Under MLflow's defaults a refused request takes about 244 s; ours about 8 s, plus MLflow's lazy imports of the
# first request (5 s on 2 loaded cores).
BOUND_S = 40.0


@pytest.fixture()
def closed_port_uri() -> str:
    """A URI of 127.0.0.1 whose port nothing listens on: every connection is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture()
def bounds_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLFLOW_HTTP_REQUEST_* variable set, and those the tracker sets removed again after the test."""
    for name in HTTP_BOUNDS:
        monkeypatch.setenv(name, "")  # recorded first, so that the test's end puts back what was there before
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)


def test_start_and_attach_fail_fast_naming_the_uri(closed_port_uri, bounds_unset):
    tracker = MLflowTracker(closed_port_uri)
    assert {name: os.environ[name] for name in HTTP_BOUNDS} == HTTP_BOUNDS
    began = time.monotonic()
    with pytest.raises(ActionScoresError) as raised:
        tracker.start(experiment="unreachable")
    assert time.monotonic() - began < BOUND_S
    message = str(raised.value)
    assert f"server at {closed_port_uri} is unreachable (ConnectionError after 3 retries, 15 s per try)" in message
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in message and "MLFLOW_HTTP_REQUEST_TIMEOUT" in message
    began = time.monotonic()
    with pytest.raises(ActionScoresError, match=f"server at {closed_port_uri} is unreachable"):  # not "not found"
        tracker.attach("0123456789abcdef")
    assert time.monotonic() - began < BOUND_S


def test_the_users_settings_win(closed_port_uri, bounds_unset, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    tracker = MLflowTracker(closed_port_uri)
    assert [os.environ[name] for name in HTTP_BOUNDS] == ["0", "1", "7"]  # only the unset one is ours
    with pytest.raises(ActionScoresError, match=r"ConnectionError after 0 retries, 7 s per try"):
        tracker.attach("0123456789abcdef")


def test_a_server_that_answers_is_not_called_unreachable(mlflow_server):
    with pytest.raises(ActionScoresError, match=r"run '0123456789abcdef' not found at tracking URI"):
        MLflowTracker(mlflow_server).attach("0123456789abcdef")


def test_upload_command_fails_fast_naming_the_uri(closed_port_uri, tmp_path):
    """`action-scores upload` in a fresh process, as a user runs it: an error line, not minutes of retries."""
    spool = tmp_path / "mlflow-0123456789abcdef"
    (spool / "pending").mkdir(parents=True)
    (spool / "run.json").write_text(json.dumps({"backend": "mlflow", "run_id": "0123456789abcdef",
                                                "tracking_uri": closed_port_uri}))
    env = {name: value for name, value in os.environ.items() if name not in HTTP_BOUNDS and name != "MLFLOW_RUN_ID"}
    env["PYTHONPATH"] = str(ROOT)
    began = time.monotonic()
    done = subprocess.run([str(Path(sys.executable).parent / "action-scores"), "upload", "--spool", str(spool),
                           "--tracking-uri", closed_port_uri], env=env, capture_output=True, text=True,
                          timeout=300)
    elapsed = time.monotonic() - began
    assert done.returncode == 2, done.stderr
    assert f"action-scores: error: the MLflow tracking server at {closed_port_uri} is unreachable" in done.stderr
    assert elapsed < BOUND_S + 20  # the process's own imports too
