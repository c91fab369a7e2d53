"""The job against a real MLflow server that requires login (`mlflow server --app-name basic-auth`):
the run's owner succeeds, a user with read-only access gets "permission denied" before anything
is computed, a wrong password is named as such, and no credential ends up anywhere."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from tests.conftest import BIN, ROOT, _free_port, run_command, snapshot_run, start_server, stop_server
from tests.test_analyze import _good_files, _make_run

ADMIN = "admin"


@contextmanager
def _as(user: str, password: str) -> Iterator[None]:
    """This process's MLflow clients logged in as `user` (MLflow reads the credentials from the environment)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A basic-auth server with three users: the admin, `owner` (creates the experiment, so may edit it)
    and `reader` (the default permission, READ). Returns the URI and each user's password."""
    root = tmp_path_factory.mktemp("auth-server")
    passwords = {name: f"{name}-{uuid.uuid4().hex}" for name in (ADMIN, "owner", "reader")}
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {passwords[ADMIN]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex)
    process = start_server(root, port, "--app-name", "basic-auth", env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        from mlflow.server.auth.client import AuthServiceClient

        with _as(ADMIN, passwords[ADMIN]):
            for name in ("owner", "reader"):
                AuthServiceClient(uri).create_user(name, passwords[name])
        yield {"uri": uri, **passwords}
    finally:
        stop_server(process)


def _env(server: dict[str, str], user: str, password: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=server["uri"], PYTHONPATH=str(ROOT),
               MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _secrets(server: dict[str, str]) -> list[str]:
    return [server[name] for name in (ADMIN, "owner", "reader")]


def _assert_no_secret_in_run(server: dict[str, str], run_id: str, tmp_path: Path) -> dict:
    """Every param, tag, metric name and artifact byte of the run, read as the admin, holds no password."""
    with _as(ADMIN, server[ADMIN]):
        client = mlflow.MlflowClient(server["uri"])
        snapshot = snapshot_run(client, run_id)
        root = Path(client.download_artifacts(run_id, "", str(tmp_path / "all")))
    blobs = [path.read_bytes() for path in root.rglob("*") if path.is_file()]
    text = repr({key: value for key, value in snapshot.items() if key != "files"})
    for secret in _secrets(server):
        assert secret not in text
        assert not any(secret.encode() in blob for blob in blobs)
    return snapshot


def _owner_run(server: dict[str, str], tmp_path: Path) -> str:
    with _as("owner", server["owner"]):
        client = mlflow.MlflowClient(server["uri"])
        experiment_id = client.create_experiment(f"auth-{uuid.uuid4().hex[:8]}")  # the creator may manage it
        return _make_run(client, experiment_id, tmp_path, _good_files(n=6, epochs=3))


def test_the_owner_trains_and_analyses_and_no_credential_is_logged(auth_server: dict[str, str], tmp_path: Path) -> None:
    env = _env(auth_server, "owner", auth_server["owner"])
    trained = run_command([str(BIN / "python"), "-m", "experiments.classify", "--epochs", "2", "--experiment",
                           f"auth-train-{uuid.uuid4().hex[:8]}"], dict(env, ACTION_SCORES_SPOOL=str(tmp_path / "spool")))
    run_id = trained.stdout.split("run ")[-1].split(" finished")[0]
    analysed = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id], env)
    assert f"run {run_id}: done (test: 360 samples x 2 epochs)" in analysed.stdout
    snapshot = _assert_no_secret_in_run(auth_server, run_id, tmp_path)
    assert snapshot["tags"]["action_scores.status"] == "done"
    assert "action_scores/test/loss/hardest.png" in snapshot["files"]
    for output in (trained.stdout, trained.stderr, analysed.stdout, analysed.stderr):
        assert not any(secret in output for secret in _secrets(auth_server))


def test_a_reader_gets_permission_denied_before_anything_is_computed(auth_server: dict[str, str], tmp_path: Path) -> None:
    run_id = _owner_run(auth_server, tmp_path)
    with _as(ADMIN, auth_server[ADMIN]):
        before = snapshot_run(mlflow.MlflowClient(auth_server["uri"]), run_id)
    result = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id, "--no-panels"],
                         _env(auth_server, "reader", auth_server["reader"]), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"action-scores: error: permission denied: the MLflow user (MLFLOW_TRACKING_USERNAME) may read run {run_id} "
        "but not write to it; the job needs EDIT permission on the run's experiment. Nothing was computed or written"
    )
    assert "download" not in result.stderr and "score test" not in result.stderr  # no progress bar ever started
    assert not any(secret in result.stdout + result.stderr for secret in _secrets(auth_server))
    with _as(ADMIN, auth_server[ADMIN]):
        assert snapshot_run(mlflow.MlflowClient(auth_server["uri"]), run_id) == before


def test_a_wrong_password_is_named_without_showing_it(auth_server: dict[str, str], tmp_path: Path) -> None:
    run_id = _owner_run(auth_server, tmp_path)
    wrong = f"not-{auth_server['owner']}"
    result = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id, "--no-panels"],
                         _env(auth_server, "owner", wrong), check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"action-scores: error: authentication failed at tracking URI {auth_server['uri']}: check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    )
    assert wrong not in result.stdout + result.stderr
