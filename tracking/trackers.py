"""One small tracker interface, one class per backend, one registry.

The recorder, the training loops and the post-hoc job speak only to `Tracker`; each
backend hides its own quirks (MLflow's param length and batch limits, params that
`mlflow run` already logged). Backends import their package lazily, so the library
imports without them. The native client stays reachable through `Tracker.native`.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from tracking import contract
from tracking.errors import ActionScoresError
from tracking.uploads import Operation, Uploader, UploadRefused, left_behind_message, spool_root

log = logging.getLogger(__name__)
# MLflow error codes of a write that no retry can make succeed (the run deleted or missing, no permission).
REFUSALS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"})


class Tracker(ABC):
    """A run on a tracking backend: the training side writes to it, the post-hoc job reads it."""

    name: ClassVar[str]
    _run_id: str | None = None

    @property
    def run_id(self) -> str:
        """Id of the run this tracker writes to and reads from."""
        if self._run_id is None:
            raise ActionScoresError("no run: call start() or attach() first")
        return self._run_id

    @property
    @abstractmethod
    def native(self) -> Any:
        """The backend's own client, as an escape hatch."""

    # --- lifecycle -----------------------------------------------------------------
    @abstractmethod
    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        """Open a new run (or the one a launcher such as `mlflow run` opened); return its id."""

    @abstractmethod
    def attach(self, run_id: str) -> None:
        """Point at an existing run, for the post-hoc job; unknown ids are an error."""

    @abstractmethod
    def finish(self, failed: bool = False) -> None:
        """Close the run that `start` opened."""

    # --- writing -------------------------------------------------------------------
    @abstractmethod
    def log_params(self, params: Mapping[str, object]) -> None:
        """Record settings of the run (values become strings)."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record numeric results."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record mutable labels of the run (the job's status lives here)."""

    @abstractmethod
    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        """Upload one file into `artifact_dir` of the run, replacing a file of the same name."""

    # --- reading -------------------------------------------------------------------
    @abstractmethod
    def params(self) -> dict[str, str]:
        """The run's params."""

    @abstractmethod
    def tags(self) -> dict[str, str]:
        """The run's tags."""

    @abstractmethod
    def list_files(self, artifact_dir: str) -> list[str]:
        """Every file under `artifact_dir`, as run-relative posix paths; [] when absent."""

    @abstractmethod
    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        """Fetch one file to `dst_dir/<artifact_path>` and return the local path."""

    @abstractmethod
    def find_runs(self, experiment: str) -> list[str]:
        """Ids of the finished runs of an experiment, newest first."""

    @abstractmethod
    def artifact_uri(self, artifact_path: str) -> str:
        """Where a file of the run can be found, for telling the user."""

    def log_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Show a ranked set of samples natively where the backend has a view for it.

        Each row holds `image` (uint8 array), `caption` and plain columns. MLflow has no
        such view (the PNG panels are its view), so the default does nothing.
        """

    # --- writes during training: never block the loop -----------------------------------
    @property
    def spool_dir(self) -> Path:
        """This run's local spool folder (`$ACTION_SCORES_SPOOL/<backend>-<run id>`): where the
        recorder writes tables, kept until they are uploaded."""
        return spool_root() / f"{self.name}-{self.run_id}"

    def upload_later(self, local_path: str | Path, artifact_dir: str) -> None:
        """Hand a finished file over for upload without waiting for the network.

        Backends that write to local disk (W&B offline, a folder) just log it now; a
        network backend queues it (see `tracking.uploads`) and `finish` waits for it.
        """
        self.log_artifact(local_path, artifact_dir)

    def log_metrics_later(self, metrics: Mapping[str, float], step: int) -> None:
        """`log_metrics` without waiting for the network, in order with `upload_later`."""
        self.log_metrics(metrics, step)

    @contextmanager
    def job_lock(self) -> Iterator[None]:
        """Hold the run for one post-hoc job, so that two jobs never write it at once.

        The default holds nothing: a W&B offline run is a local folder the job resumes by
        itself. MLflow runs are locked with a tag (see `MLflowTracker.job_lock`).
        """
        yield

    def log_artifacts(self, local_dir: str | Path, artifact_dir: str) -> None:
        """Upload every file under `local_dir`, keeping the folder layout."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.parent.relative_to(root).as_posix()
            self.log_artifact(path, artifact_dir if relative == "." else f"{artifact_dir}/{relative}")


def _stale_lock(held: str) -> bool:
    """Whether a lock tag's job is gone: its process has exited (same host), or the tag is older than the TTL."""
    owner, _, since = held.partition(" ")
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    try:
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return True  # not a lock this library wrote
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
    ttl = os.environ.get("ACTION_SCORES_LOCK_TTL", "")
    return age > (float(ttl) if ttl else 6 * 3600)


def _end_run_without_waiting(status: str) -> None:
    """Close this process's active MLflow run after its queued writes: the spooled `end` operation
    is what ends it on the server (already done, or left to `action-scores upload`), so this makes
    one quick try only. Neither this call nor MLflow's end-of-process hook then waits minutes on
    retries when the server is away, and a later `start` in this process works."""
    import mlflow
    from mlflow.exceptions import MlflowException

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    with patched_environ(quick):
        try:
            mlflow.end_run(status=status)  # forgets the run locally first, then tries the server once
        except MlflowException:
            pass


@contextmanager
def patched_environ(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: remove) environment variables for a block, then put back exactly what was there:
    MLflow reads its settings, and exports the active experiment, through the environment."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(saved)


def _set_environ(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def redact(uri: str) -> str:
    """A URI without its `user:password@` part, safe to print in errors."""
    return re.sub(r"//[^/]*@", "//***@", uri)  # up to the last '@' of the authority, as urllib does


class MLflowTracker(Tracker):
    """MLflow backend; any tracking URI works (sqlite file, server, Databricks).

    Writes made during training through `upload_later` and `log_metrics_later` go through
    one background `Uploader` per run, so a server outage never blocks or kills training.
    """

    name = "mlflow"
    _MAX_PARAM_LENGTH = 6000
    _MAX_PARAMS_PER_BATCH = 100
    LOCK_SETTLE_SECONDS = 0.5

    def __init__(self, tracking_uri: str | None = None) -> None:
        import mlflow

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        self._started = False
        self._uploader: Uploader | None = None
        self._repository: tuple[str, Any] | None = None  # (run id, its artifact store), see _artifact_repository
        self.left_behind = ""  # what `finish` said about writes the server did not take in time

    @property
    def native(self) -> Any:
        return self._client

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        # `mlflow run` exports MLFLOW_RUN_ID: start_run() then resumes that run.
        if experiment and "MLFLOW_RUN_ID" not in os.environ:
            mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
        self._run_id = run.info.run_id
        self._started = True
        return self._run_id

    def attach(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "UNAUTHENTICATED":
                raise ActionScoresError(
                    f"authentication failed at tracking URI {redact(self.tracking_uri)}: check "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from None
            raise ActionScoresError(
                f"run {run_id!r} not found at tracking URI {redact(self.tracking_uri)} "
                f"({error.error_code})"
            ) from None
        self._run_id = run_id

    def finish(self, failed: bool = False) -> None:
        """Wait (bounded) for queued writes, then end the run.

        If the server does not take them in time, the run is left as the server has it
        and a warning names the spool folder and the command that finishes the job.
        """
        import mlflow

        status = "FAILED" if failed else "FINISHED"
        if self._uploader is not None:
            uploader, self._uploader = self._uploader, None
            if self._started:
                uploader.submit("end", status=status)
            left = uploader.close()
            if left or uploader.refused:
                self.left_behind = left_behind_message(uploader.spool, left, redact(uploader.last_error),
                                                       redact(self.tracking_uri), uploader.refused)
                log.warning(self.left_behind)
            if self._started:  # the spooled `end` ends the run on the server (or will, by upload)
                self._started = False
                _end_run_without_waiting(status)
            return
        if self._started:
            mlflow.end_run(status=status)
            self._started = False

    def _uploads(self) -> Uploader:
        """The background uploader of the current run, started on first use."""
        if self._uploader is None or self._uploader.spool != self.spool_dir:
            record = {"backend": self.name, "run_id": self.run_id, "tracking_uri": redact(self.tracking_uri)}
            self._uploader = Uploader(self.spool_dir, record, functools.partial(self.perform, self.run_id))
        return self._uploader

    def upload_later(self, local_path: str | Path, artifact_dir: str) -> None:
        self._uploads().submit("artifact", path=str(Path(local_path).resolve()), artifact_dir=artifact_dir)

    def log_metrics_later(self, metrics: Mapping[str, float], step: int) -> None:
        self._uploads().submit("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=int(step),
                               timestamp_ms=int(time.time() * 1000))  # the history shows when, not when uploaded

    def perform(self, run_id: str, operation: Operation, maybe_done: bool) -> None:
        """Do one queued write to `run_id`; raises on any failure.

        `maybe_done`: the write may have reached the server already (a retry, a replay), so
        metric values already in the history at that step are not logged twice.
        """
        from mlflow.exceptions import MlflowException

        payload = operation.payload
        try:
            if operation.kind == "artifact":
                if not Path(payload["path"]).is_file():
                    raise UploadRefused(f"spooled table {payload['path']} is gone")
                self._client.log_artifact(run_id, payload["path"], payload["artifact_dir"])
            elif operation.kind == "metrics":
                metrics, step = payload["metrics"], payload["step"]
                if maybe_done:
                    metrics = {key: value for key, value in metrics.items() if (step, value) not in
                               {(m.step, m.value) for m in self._client.get_metric_history(run_id, key)}}
                self._log_metrics(run_id, metrics, step, payload.get("timestamp_ms"))  # older spools lack it
            elif operation.kind == "end":
                self._client.set_terminated(run_id, payload["status"])
            else:
                raise UploadRefused(f"{operation.file}: unknown operation {operation.kind!r}")
        except MlflowException as error:
            if error.error_code in REFUSALS:  # a deleted run, a missing one, no permission: final
                raise UploadRefused(f"{error.error_code}: {redact(str(error))[:300]}") from None
            raise

    @contextmanager
    def job_lock(self) -> Iterator[None]:
        """Hold the run with the tag `action_scores.lock` = "<host>:<pid>:<nonce> <UTC time>".

        A lock held by another live job is an error that names it. A lock is stale, and
        taken over, when its process is gone (same host) or it is older than
        `$ACTION_SCORES_LOCK_TTL` seconds (6 h). MLflow has no compare-and-set, so after
        setting the tag the job waits a moment and reads it back: of two jobs that set it
        at once, only the last writer goes on. The tag is removed when the job ends.
        """
        held = self.tags().get(contract.LOCK_TAG)
        if held and not _stale_lock(held):
            raise ActionScoresError(
                f"run {self.run_id} is being analysed by another job ({contract.LOCK_TAG} = {held!r}); "
                "try again when it has finished. If that job is gone, delete the tag (MLflow UI, or "
                f"MlflowClient().delete_tag(run_id, {contract.LOCK_TAG!r}))"
            )
        from mlflow.exceptions import MlflowException

        mine = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]} {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
        def taken_by_another(holder: str | None) -> ActionScoresError:
            return ActionScoresError(
                f"run {self.run_id}: another job took it at the same moment ({contract.LOCK_TAG} = {holder!r}); "
                "it does the work"
            )

        try:  # the job's first write, before anything is downloaded or computed
            self._client.set_tag(self.run_id, contract.LOCK_TAG, mine)
        except MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise ActionScoresError(
                    f"permission denied: the MLflow user (MLFLOW_TRACKING_USERNAME) may read run {self.run_id} but "
                    "not write to it; the job needs EDIT permission on the run's experiment. Nothing was computed "
                    "or written"
                ) from None
            holder = self.tags().get(contract.LOCK_TAG)
            if holder and holder != mine:  # two first inserts of the tag at once: the store kept the other's
                raise taken_by_another(holder) from None
            raise
        time.sleep(self.LOCK_SETTLE_SECONDS)
        now_held = self.tags().get(contract.LOCK_TAG)
        if now_held != mine:
            raise taken_by_another(now_held)
        try:
            yield
        finally:
            if self.tags().get(contract.LOCK_TAG) == mine:
                self._client.delete_tag(self.run_id, contract.LOCK_TAG)

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        # Params are immutable in MLflow, and `mlflow run` logs the entry point's
        # parameters itself: keep what is there rather than fail on a reformatted value.
        existing = self.params()
        fresh = [
            Param(key, str(value)[: self._MAX_PARAM_LENGTH])
            for key, value in params.items()
            if key not in existing
        ]
        for start in range(0, len(fresh), self._MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=fresh[start : start + self._MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log_metrics(self.run_id, metrics, step)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None,
                     timestamp_ms: int | None = None) -> None:
        """`timestamp_ms`: when the values were measured (a queued write's own time), default now."""
        from mlflow.entities import Metric

        when = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        entries = [Metric(key, float(value), when, step or 0) for key, value in metrics.items()]
        for start in range(0, len(entries), 1000):
            self._client.log_batch(run_id, metrics=entries[start : start + 1000])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_dir)

    def params(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.params)

    def tags(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.tags)

    def list_files(self, artifact_dir: str) -> list[str]:
        files: list[str] = []
        pending = [artifact_dir]
        while pending:
            for info in self._client.list_artifacts(self.run_id, pending.pop()):
                (pending if info.is_dir else files).append(info.path)
        return sorted(files)

    def _artifact_repository(self) -> Any:
        """The run's artifact store, resolved once per run: `client.download_artifacts` resolves
        it again for every file (three tracking requests per file before the one that fetches)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        cached = self._repository
        if cached is None or cached[0] != self.run_id:
            uri = self._client.get_run(self.run_id).info.artifact_uri
            cached = (self.run_id, get_artifact_repository(uri, tracking_uri=self.tracking_uri))
            self._repository = cached
        return cached[1]

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        # Refuse paths that leave dst_dir; the store's repository keeps the artifact path under dst_dir.
        relative = contract.relative_artifact_path(artifact_path).as_posix()
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(self._artifact_repository().download_artifacts(relative, str(dst_dir)))

    def find_runs(self, experiment: str) -> list[str]:
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            raise ActionScoresError(
                f"no experiment named {experiment!r} at tracking URI {redact(self.tracking_uri)}"
            )
        runs = self._client.search_runs(
            [found.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50000,
        )
        return [run.info.run_id for run in runs]

    def artifact_uri(self, artifact_path: str) -> str:
        return f"{self._client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"


class FanOutTracker(Tracker):
    """Several backends as one (`--tracker both`): every write goes to each, reads come from the first."""

    name = "both"

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = trackers or [MLflowTracker(), WandbTracker()]

    @property
    def run_id(self) -> str:
        return self.trackers[0].run_id

    @property
    def native(self) -> Any:
        return [tracker.native for tracker in self.trackers]

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        for tracker in self.trackers:
            tracker.start(experiment, run_name)
        # Each run names the others, so that the same training can be found on every backend.
        self.set_tags({f"action_scores.{tracker.name}_run_id": tracker.run_id for tracker in self.trackers})
        return self.run_id

    def attach(self, run_id: str) -> None:
        raise ActionScoresError("attach to one backend at a time: use the mlflow or the wandb tracker")

    def finish(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.finish(failed)

    def log_params(self, params: Mapping[str, object]) -> None:
        for tracker in self.trackers:
            tracker.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for tracker in self.trackers:
            tracker.log_metrics(metrics, step)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for tracker in self.trackers:
            tracker.set_tags(tags)

    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        for tracker in self.trackers:
            tracker.log_artifact(local_path, artifact_dir)

    def upload_later(self, local_path: str | Path, artifact_dir: str) -> None:
        for tracker in self.trackers:
            tracker.upload_later(local_path, artifact_dir)

    def log_metrics_later(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log_metrics_later(metrics, step)

    def log_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        for tracker in self.trackers:
            tracker.log_samples(key, rows)

    def params(self) -> dict[str, str]:
        return self.trackers[0].params()

    def tags(self) -> dict[str, str]:
        return self.trackers[0].tags()

    def list_files(self, artifact_dir: str) -> list[str]:
        return self.trackers[0].list_files(artifact_dir)

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        return self.trackers[0].download(artifact_path, dst_dir)

    def find_runs(self, experiment: str) -> list[str]:
        return self.trackers[0].find_runs(experiment)

    def artifact_uri(self, artifact_path: str) -> str:
        return self.trackers[0].artifact_uri(artifact_path)


# Imported here, after `Tracker` exists, because the W&B backend subclasses it; it does
# not import wandb itself until a run starts.
from tracking.wandb_backend import WandbTracker  # noqa: E402

TRACKERS: dict[str, type[Tracker]] = {
    MLflowTracker.name: MLflowTracker, WandbTracker.name: WandbTracker, FanOutTracker.name: FanOutTracker,
}


def make_tracker(name: str, **kwargs: Any) -> Tracker:
    """The tracker registered under `name`; an unknown name lists the valid ones."""
    try:
        cls = TRACKERS[name]
    except KeyError:
        raise ActionScoresError(f"unknown tracker {name!r}; choose one of {sorted(TRACKERS)}") from None
    return cls(**kwargs)
