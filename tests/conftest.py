"""Shared fixtures: a real `mlflow server` on 127.0.0.1 for the whole session; for the S3 tests, a local
S3 store (moto in server mode) and a tracking server in each of its two modes (`S3_MODES`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def wait_until_healthy(uri: str, process: subprocess.Popen, timeout: float = 300, path: str = "/health") -> None:
    """Poll `uri` + `path` until the server answers, failing early if it died (slow to start on a busy machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{uri}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"server at {uri} not healthy after {timeout}s")


def start_server(root: Path, port: int, *options: str, env: dict[str, str] | None = None,
                 artifacts: Sequence[str] | None = None, workers: int = 2) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port`: sqlite backend under `root`, output appended to root/server.log;
    healthy when this returns. `artifacts`: the artifact-store options (default: a served store under `root`;
    see `S3_MODES` for the S3 ones)."""
    if artifacts is None:
        artifacts = ("--artifacts-destination", str(root / "artifacts"))
    with open(root / "server.log", "ab") as log:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", *artifacts, "--workers", str(workers), *options],
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
def local_mlflow_server(root: Path, env: dict[str, str] | None = None, artifacts: Sequence[str] | None = None,
                        workers: int = 2) -> Iterator[str]:
    """A real `mlflow server` on a free port of 127.0.0.1 for the block's duration; yields its URI.
    Tests and benchmarks share it (`start_server` says what the options mean)."""
    process = start_server(root, port := _free_port(), env=env, artifacts=artifacts, workers=workers)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


class Relay:
    """A TCP relay from a free port of 127.0.0.1 to the local port `target`, which a test can cut:
    while cut, new connections are refused and open ones are reset, as when a store goes off the
    network; `restore` serves the same port again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = _free_port()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:  # either side gone: both are (HTTP clients do not half-close)
            with self._lock:
                self._open -= {source, sink}
            _close(source)
            _close(sink)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()


@dataclass(frozen=True)
class S3Store:
    """A local S3-compatible store (moto in server mode) reached through a `Relay`. `env` holds what a
    client of it needs: the standard AWS variables (dummy credentials; `secret` must never show up
    anywhere) and MLflow's `MLFLOW_S3_ENDPOINT_URL`."""

    bucket: str
    relay: Relay
    env: dict[str, str]

    @property
    def secret(self) -> str:
        return self.env["AWS_SECRET_ACCESS_KEY"]

    def client(self, behind_the_relay: bool = False) -> Any:
        """A boto3 client of the store, to see what really landed in the bucket (`behind_the_relay`: even
        while the store is unreachable)."""
        import boto3

        endpoint = f"http://127.0.0.1:{self.relay.target}" if behind_the_relay else self.env["MLFLOW_S3_ENDPOINT_URL"]
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.secret)

    @contextmanager
    def unreachable(self) -> Iterator[None]:
        """The store off the network for the block's duration (connections refused), then back."""
        self.relay.cut()
        try:
            yield
        finally:
            self.relay.restore()


# How an `mlflow server` keeps its artifacts in the bucket: proxied (clients talk to the server, which
# talks to S3) or direct (the server hands out s3:// URIs; clients read and write S3 themselves).
S3_MODES: dict[str, Callable[[str], tuple[str, ...]]] = {
    "proxied": lambda bucket: ("--artifacts-destination", f"s3://{bucket}/proxied"),
    "direct": lambda bucket: ("--no-serve-artifacts", "--default-artifact-root", f"s3://{bucket}/direct"),
}


@dataclass(frozen=True)
class S3MlflowServer:
    """A session `mlflow server` whose artifacts live in the `S3Store` under `s3://<bucket>/<mode>/`."""

    uri: str
    mode: str
    root: Path  # its sqlite file and server.log
    store: S3Store


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    """moto in server mode on 127.0.0.1 with one empty bucket, for the whole session."""
    pytest.importorskip("moto.server", reason="the S3 tests need moto: pip install '.[test]'")
    root = tmp_path_factory.mktemp("s3")
    port = _free_port()
    with open(root / "moto.log", "ab") as log:
        process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, path="/moto-api/")
        relay = Relay(port)
        env = {"AWS_ACCESS_KEY_ID": "action-scores-test", "AWS_SECRET_ACCESS_KEY": f"s3-secret-{uuid.uuid4().hex}",
               "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"}
        store = S3Store("action-scores", relay, env)
        store.client().create_bucket(Bucket=store.bucket)
        yield store
        relay.cut()
    finally:
        stop_server(process)


@pytest.fixture(scope="session", params=sorted(S3_MODES))
def s3_mlflow_server(request: pytest.FixtureRequest, s3_store: S3Store,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3MlflowServer]:
    """A real tracking server (sqlite backend) whose artifacts live in `s3_store`, once per mode of `S3_MODES`."""
    mode = request.param
    root = tmp_path_factory.mktemp(f"mlflow-s3-{mode}")
    with local_mlflow_server(root, env=dict(os.environ, **s3_store.env), artifacts=S3_MODES[mode](s3_store.bucket)) as uri:
        yield S3MlflowServer(uri, mode, root, s3_store)


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

    import mlflow

    kept = {key: os.environ.get(key) for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    with patched_environ({"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": None, **kept}):
        # A tracker started earlier in this process (another test's server) set mlflow's process-wide
        # URI, which outranks the variable: a run made here would go to that server.
        mlflow.set_tracking_uri(uri)
        yield


def run_command(args: list[str], env: dict[str, str], cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run a project command as a user would, with the venv's executables first on PATH."""
    env = dict(env, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    result = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sharded_epochs(client, run_id: str, split: str, dst: Path, ranks: int = 2) -> list:
    """Every epoch of a split that `ranks` processes wrote in parts (`epoch_EEEE/part-RRRRR.parquet`), as
    one DataFrame sorted by `sample_id`: the union of the parts, the first occurrence kept in part order.
    Asserts that each epoch is a folder of exactly one part per rank, each part sorted with every id once."""
    import pandas as pd

    local = Path(client.download_artifacts(run_id, f"per_sample_losses/{split}", str(dst)))
    epochs = []
    for folder in sorted(local.iterdir()):
        assert folder.is_dir() and folder.name.startswith("epoch_"), folder  # no single-file epoch beside parts
        names = sorted(path.name for path in folder.iterdir())
        assert names == [f"part-{rank:05d}.parquet" for rank in range(ranks)], names
        parts = [pd.read_parquet(folder / name) for name in names]
        for part in parts:
            assert part["sample_id"].is_monotonic_increasing and part["sample_id"].is_unique
        whole = pd.concat(parts).drop_duplicates("sample_id", keep="first")
        epochs.append(whole.sort_values("sample_id").reset_index(drop=True))
    return epochs


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
