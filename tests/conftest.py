"""Shared fixtures: a real `mlflow server` on 127.0.0.1 for the whole session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # mlflow is imported only once the environment below is set
    import mlflow

    from tracking.backends import MLflowTracker

ROOT = Path(__file__).resolve().parents[1]
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # keep test logs readable
# Offline, MLflow's telemetry thread gives up and deletes an env var that request threads
# copy at the same moment (an intermittent KeyError); no test needs telemetry.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# No test uses the server's job runner (huey workers): without it a server starts in seconds,
# not minutes, on a loaded 2-core machine.
os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(uri: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Poll /health until the server answers, failing early if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {uri} not healthy after {timeout}s")


def start_server(root: Path, port: int, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`: sqlite backend and served artifact store under `root`,
    output appended to root/server.log; healthy when this returns."""
    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "2", *options],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
        )
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
    except BaseException:
        stop_server(process)
        raise
    return process


def stop_server(process: subprocess.Popen) -> None:
    """Terminate a server, killing it if it does not stop within 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def local_mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` on a free port of 127.0.0.1 for the block's duration; yields its URI.
    Tests and benchmarks share it."""
    process = start_server(root, port := _free_port())
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


@pytest.fixture(autouse=True)
def _mlflow_environment_kept() -> Iterator[None]:
    """Put back MLflow's run and experiment variables after every test: `mlflow.set_experiment` exports
    the active experiment into the environment, where a later test's `mlflow run` subprocess would
    take it (and refuse `--experiment-name` beside it)."""
    from tracking.backends import patched_environ

    keys = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    with patched_environ({key: os.environ.get(key) for key in keys}):
        yield


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of a real tracking server: sqlite backend, served artifact store in a temp dir."""
    with local_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@pytest.fixture()
def tracking_env(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for subprocesses (and this process) pointing at the session server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, PYTHONPATH=str(ROOT))
    env.pop("MLFLOW_RUN_ID", None)
    return env


@contextmanager
def in_process_training(uri: str) -> Iterator[None]:
    """Train in this process against `uri`, then put back the environment: MLflow's `set_experiment`
    exports the active experiment, which would leak into later tests' `mlflow run` subprocesses."""
    from tracking.backends import patched_environ

    kept = {key: os.environ.get(key) for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    with patched_environ({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": None, **kept}):
        yield


def run_command(args: list[str], env: dict[str, str], cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run a project command as a user would, with the venv's executables first on PATH."""
    env = dict(env, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def snapshot_run(client, run_id: str) -> dict:
    """Everything a job could change on a run: every artifact's bytes (hashed), tags, params, metric histories.

    Artifacts come in one bulk download: one request per file costs a quarter of a second here.
    """
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(client.download_artifacts(run_id, "", tmp))
        files = {
            path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }
    run = client.get_run(run_id)
    metrics = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    return {"files": files, "tags": dict(run.data.tags), "params": dict(run.data.params), "metrics": metrics}


@pytest.fixture()
def client(mlflow_server: str) -> mlflow.MlflowClient:
    """A client of the session server."""
    import mlflow

    return mlflow.MlflowClient(mlflow_server)


@pytest.fixture()
def tracker(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> MLflowTracker:
    """The job's tracker on the session server, outside any run a launcher set."""
    from tracking.backends import MLflowTracker

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return MLflowTracker(mlflow_server)


@pytest.fixture()
def experiment_id(client: mlflow.MlflowClient) -> str:
    """A fresh experiment, so each test's runs are its own."""
    return client.create_experiment(f"analyze-{uuid.uuid4().hex[:10]}")


@pytest.fixture()
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Offline W&B confined to tmp_path, for this process and its subprocesses."""
    settings = {
        "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
        "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_PROJECT": f"test-{uuid.uuid4().hex[:6]}",
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    env = dict(os.environ, **settings)
    env.pop("MLFLOW_RUN_ID", None)
    return env
