"""MLflow backend: any tracking URI works (sqlite file, server, Databricks).

Hides MLflow's quirks from callers: its param length and batch limits, params that
`mlflow run` already logged, the spooled background writes during training, and the
tag that locks a run for one post-hoc job.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tracking import contract
from tracking.backends.base import Tracker, redact
from tracking.backends.lock import SETTLE_SECONDS, tag_lock
from tracking.backends.uploads import (Operation, Uploader, UploadRefused, left_behind_message, read_run_record, replay,
                                      unwritten_error)
from tracking.errors import ActionScoresError

log = logging.getLogger(__name__)
# MLflow error codes of a write that no retry can make succeed (the run deleted or missing, no permission).
REFUSALS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"})
# What S3 (a client writing the bucket itself: `--no-serve-artifacts`) answers for good: retrying cannot help.
S3_REFUSALS = frozenset({"NoSuchBucket", "InvalidBucketName", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
                         "SignatureDoesNotMatch", "AccountProblem"})
# MLflow 3's experiment kind: model training, not GenAI. (MLflow 3.17's UI shows the view of its global
# GenAI / Model training switch instead; `?workflowType=machine_learning` in a link selects the latter.)
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def _s3_refusal(error: Exception) -> str | None:
    """The S3 error code of a boto3/botocore error that retrying cannot fix (a missing bucket, refused
    credentials), or None for anything else (a network error, a server error: tried again later).
    boto3's upload wraps S3's answer in its message: "An error occurred (NoSuchBucket) when calling ..."."""
    if not type(error).__module__.startswith(("boto3", "botocore")):
        return None
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return type(error).__name__
    code = getattr(error, "response", {}).get("Error", {}).get("Code") or next(
        iter(re.findall(r"An error occurred \((\w+)\)", str(error))), None)
    return code if code in S3_REFUSALS else None


# MLflow's client tries a request 8 times over about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7,
# MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 2) and waits 120 s for each answer (MLFLOW_HTTP_REQUEST_TIMEOUT): a training,
# an upload or a job would wait that long, silent, on a server that is away. These bound a request to about 8 s
# on a refused connection, 70 s on a server that never answers; the uploader tries again on its own schedule.
# A value the user set wins.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def _bound_http_requests() -> None:
    """Set `HTTP_BOUNDS` for this process (MLflow reads them at every request), except those the user set."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def _unreachable(error: BaseException, tracking_uri: str) -> ActionScoresError | None:
    """What to raise when MLflow's client gave up on the network (refused, reset, no answer in time, a proxy's
    503s): the URI and the variables that make it wait longer. None for an answer of the server itself."""
    import requests

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, (requests.ConnectionError, requests.Timeout,
                                                       requests.exceptions.RetryError)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    retries, timeout = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT")
    return ActionScoresError(
        f"the MLflow tracking server at {redact(tracking_uri)} is unreachable ({type(cause).__name__} after "
        f"{retries} retries, {timeout} s per try): start it or fix the URI; to wait longer for it, raise "
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR or MLFLOW_HTTP_REQUEST_TIMEOUT")


def _forget_active_run() -> None:
    """Drop this process's active MLflow run here only, without a word to the server: the spooled `end`
    operation is what ends it there (already done, or left to `action-scores upload` with the writes it
    follows). Telling the server too would end, as FINISHED, a run whose queued tables have not landed
    whenever the server answers that one call, and wait on retries when it does not. A later `start` in
    this process then works. (MLflow's `end_run` is this plus `set_terminated`; its stack is internal.)"""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        os.environ.pop("MLFLOW_RUN_ID", None)
        run = stack.pop()
        fluent._last_active_run_id.set(run.info.run_id)
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run.info.run_id, None)
        if monitor is not None:
            monitor.finish()


def _run_artifact_source(uri: str) -> Any:
    """A dataset source naming a file of a run as `runs:/<run id>/<path>` (what
    `mlflow.artifacts.download_artifacts` takes): MLflow resolves no source for a served
    store's `mlflow-artifacts:` URIs, and this one works for every store."""
    from mlflow.data.dataset_source import DatasetSource

    class RunArtifactSource(DatasetSource):
        def __init__(self, uri: str) -> None:
            self.uri = uri

        @staticmethod
        def _get_source_type() -> str:
            return "run_artifact"

        def load(self, dst_path: str | None = None) -> str:
            import mlflow.artifacts

            return mlflow.artifacts.download_artifacts(self.uri, dst_path=dst_path)

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return isinstance(raw_source, str) and raw_source.startswith("runs:/")

        @classmethod
        def _resolve(cls, raw_source: Any) -> DatasetSource:
            return cls(raw_source)

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.uri}

        @classmethod
        def from_dict(cls, source_dict: dict[Any, Any]) -> DatasetSource:
            return cls(source_dict["uri"])

    return RunArtifactSource(uri)


class MLflowTracker(Tracker):
    """MLflow backend; any tracking URI works (sqlite file, server, Databricks).

    The `log_*` family (training's writes: `log_params`, `log_metrics`, `log_artifact`, `log_table`) goes
    through one background `Uploader` per run, so a server outage never blocks or kills training; the
    `write_*` family (the job's) calls the server at once.
    """

    name = "mlflow"
    concurrent_jobs = True  # the client is thread-safe; each job's copy attaches its own run
    several_writers = True  # any process with the tracking URI and the run id writes files into the run
    _MAX_PARAM_LENGTH = 6000
    _MAX_PARAMS_PER_BATCH = 100
    LOCK_SETTLE_SECONDS = SETTLE_SECONDS

    def __init__(self, tracking_uri: str | None = None, keep_local: bool | None = None) -> None:
        """`keep_local`: keep uploaded tables in the spool folder (see `RunWriter.keep_local`)."""
        import mlflow

        self.keep_local = keep_local
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        _bound_http_requests()
        self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        self._started = False
        self._uploader: Uploader | None = None
        self._repository: tuple[str, Any] | None = None  # (run id, its artifact store), see _artifact_repository
        self._info: Any = None  # the RunInfo of the run last started or attached, see _run_info
        self.left_behind = ""  # what `finish` said about writes the server did not take in time

    @property
    def native(self) -> Any:
        return self._client

    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.tracking_uri)
        try:
            # `mlflow run` exports MLFLOW_RUN_ID: start_run() then resumes that run.
            if experiment and "MLFLOW_RUN_ID" not in os.environ:
                self._create_training_experiment(experiment)
                mlflow.set_experiment(experiment)
            run = mlflow.start_run(run_name=run_name)
        except MlflowException as error:
            unreachable = _unreachable(error, self.tracking_uri)
            if unreachable is None:
                raise
            raise unreachable from None
        self._run_id, self._info = run.info.run_id, run.info
        self._started = True
        return self._run_id

    def _create_training_experiment(self, experiment: str) -> None:
        """Create `experiment` tagged as model training, unless it exists (its kind is then the user's)."""
        from mlflow.exceptions import MlflowException

        if self._client.get_experiment_by_name(experiment) is not None:
            return
        try:
            self._client.create_experiment(experiment, tags=EXPERIMENT_KIND_TAGS)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it at the same moment
                raise

    def shared_run(self) -> dict[str, Any] | None:
        return {"backend": self.name, "options": {"tracking_uri": self.tracking_uri}, "run_id": self.run_id}

    def attach(self, run_id: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            info = self._client.get_run(run_id).info
        except MlflowException as error:
            unreachable = _unreachable(error, self.tracking_uri)
            if unreachable is not None:
                raise unreachable from None
            if error.error_code == "UNAUTHENTICATED":
                raise ActionScoresError(
                    f"authentication failed at tracking URI {redact(self.tracking_uri)}: check "
                    "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from None
            raise ActionScoresError(
                f"run {run_id!r} not found at tracking URI {redact(self.tracking_uri)} "
                f"({error.error_code})"
            ) from None
        self._run_id, self._info = run_id, info

    def finish(self, failed: bool = False) -> None:
        """Wait (bounded) for queued writes, then end the run.

        If the server does not take them in time, the run is left as the server has it
        and a warning names the spool folder and the command that finishes the job. A table the
        writer thread could not make ends the run FAILED (the job refuses a run with a gap), and
        raises `ActionScoresError` naming it unless `failed` already says the run failed.
        """
        import mlflow

        status = "FAILED" if failed else "FINISHED"
        if self._uploader is not None:
            uploader, self._uploader = self._uploader, None
            status = self._close_uploads(uploader, status if self._started else None) or status
            self._release_spool()
            if self._started:  # the spooled `end` ends the run on the server (or will, by upload)
                self._started = False
                _forget_active_run()
            if uploader.unwritten and not failed:
                raise unwritten_error(self.run_id, uploader.unwritten)
            return
        self._release_spool()
        if self._started:
            mlflow.end_run(status=status)
            self._started = False

    def _close_uploads(self, uploader: Uploader, end_status: str | None) -> str:
        """Close `uploader` within its bound (queueing the run's end when `end_status` is given); say what it
        left behind. Returns the status it queued ("" for none): FAILED when a table is missing."""
        left = uploader.close(end_status)
        if left or uploader.refused or uploader.unwritten:
            self.left_behind = left_behind_message(uploader.spool, left, redact(uploader.last_error),
                                                   redact(self.tracking_uri), uploader.refused, uploader.unwritten)
            log.warning(self.left_behind)
        return uploader.end_status

    def _uploads(self) -> Uploader:
        """The background uploader of the current run, started on first use; one of another run (a new
        `start` in this process) is closed first, so that its threads do not outlive it."""
        if self._uploader is not None and self._uploader.spool != self.spool_dir:
            old, self._uploader = self._uploader, None
            self._close_uploads(old, None)
        if self._uploader is None:
            record = {"backend": self.name, "run_id": self.run_id, "tracking_uri": redact(self.tracking_uri)}
            self._uploader = Uploader(self._claimed_spool(), record, functools.partial(self.perform, self.run_id),
                                      self.keep_local)
        return self._uploader

    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        self._uploads().submit("artifact", path=str(Path(local_path).resolve()), artifact_dir=artifact_dir)

    def _table_uploads(self) -> Uploader:
        return self._uploads()  # one queue: a table's upload keeps its place among the run's other writes

    def log_params(self, params: Mapping[str, object]) -> None:
        self._uploads().submit("params", params={key: str(value) for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._uploads().submit("metrics", metrics={k: float(v) for k, v in metrics.items()}, step=int(step),
                               timestamp_ms=int(time.time() * 1000))  # the history shows when, not when uploaded

    def upload_spool(self, spool: Path, run_id: str | None = None) -> list[Operation]:
        """Replay the spool's pending and set-aside writes in order (see `tracking.backends.uploads.replay`)."""
        record = read_run_record(spool)
        if record.get("backend") != self.name:
            raise ActionScoresError(f"{spool} holds writes for a {record.get('backend')!r} run, not an MLflow run")
        if run_id and run_id != record["run_id"]:
            raise ActionScoresError(f"{spool} belongs to run {record['run_id']}, not {run_id}")
        self.attach(record["run_id"])
        return replay(spool, functools.partial(self.perform, self.run_id), self.keep_local)

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
            elif operation.kind == "params":
                self._log_params(run_id, payload["params"])
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
        except ImportError as error:  # the run's artifact store needs a client package this process lacks
            raise UploadRefused(f"{error}: the run's artifact store needs it in the training environment "
                                "(for s3://: pip install 'action-scores[s3]')") from None
        except Exception as error:
            code = _s3_refusal(error)
            if code is None:
                raise
            raise UploadRefused(f"S3 refused it ({code}): {redact(str(error))[:300]}; check the bucket and the "
                                "AWS credentials of the training environment") from None

    @contextmanager
    def job_lock(self) -> Iterator[None]:
        """Hold the run with the tag `action_scores.lock` (see `tracking.backends.lock.tag_lock`)."""
        with tag_lock(self.run_id, lambda: self.tags().get(contract.LOCK_TAG), self._write_lock_tag,
                      lambda: self._client.delete_tag(self.run_id, contract.LOCK_TAG), self.LOCK_SETTLE_SECONDS):
            yield

    def _write_lock_tag(self, value: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.set_tag(self.run_id, contract.LOCK_TAG, value)
        except MlflowException as error:
            if error.error_code == "PERMISSION_DENIED":
                raise ActionScoresError(
                    f"permission denied: the MLflow user (MLFLOW_TRACKING_USERNAME) may read run {self.run_id} but "
                    "not write to it; the job needs EDIT permission on the run's experiment. Nothing was computed "
                    "or written"
                ) from None
            raise

    def write_params(self, params: Mapping[str, object]) -> None:
        self._log_params(self.run_id, params)

    def _log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Params are immutable in MLflow, and `mlflow run` logs the entry point's parameters itself:
        keep what is there rather than fail on a reformatted value (this also makes a replay idempotent)."""
        from mlflow.entities import Param

        existing = self._client.get_run(run_id).data.params
        fresh = [
            Param(key, str(value)[: self._MAX_PARAM_LENGTH])
            for key, value in params.items()
            if key not in existing
        ]
        for start in range(0, len(fresh), self._MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=fresh[start : start + self._MAX_PARAMS_PER_BATCH])

    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
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

    def write_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_dir)

    def write_dataset(self, local_path: str | Path, artifact_dir: str, name: str, context: str) -> None:
        """The file, then a dataset input of the run (the run page's "Datasets used"), its source the
        uploaded file, its digest MLflow's hash of the table, tagged with `context`."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        self.write_artifact(local_path, artifact_dir)
        source = _run_artifact_source(f"runs:/{self.run_id}/{artifact_dir}/{Path(local_path).name}")
        dataset = mlflow.data.from_pandas(pd.read_parquet(local_path), source=source, name=name)
        self._client.log_inputs(self.run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                           [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    def params(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.params)

    def tags(self) -> dict[str, str]:
        return dict(self._client.get_run(self.run_id).data.tags)

    def list_files(self, artifact_dir: str) -> list[str]:
        """One listing request per folder, to the run's own store (`_artifact_repository`): `client.list_artifacts`
        first reads the run, and looks for logged models' files too (0.5 s for a run's two folders, not 0.1 s)."""
        files: list[str] = []
        pending = [artifact_dir]
        repository = self._artifact_repository()
        while pending:
            for info in repository.list_artifacts(pending.pop()):
                (pending if info.is_dir else files).append(info.path)
        return sorted(files)

    def _run_info(self) -> Any:
        """The run's info, fetched once per run: the job asks for its artifact root and experiment once per
        panel it names, and neither changes (status does: read it from the server, not from here)."""
        if self._info is None or self._info.run_id != self.run_id:
            self._info = self._client.get_run(self.run_id).info
        return self._info

    def _artifact_repository(self) -> Any:
        """The run's artifact store, resolved once per run: `client.download_artifacts` resolves
        it again for every file (three tracking requests per file before the one that fetches)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        cached = self._repository
        if cached is None or cached[0] != self.run_id:
            repository = get_artifact_repository(self._run_info().artifact_uri, tracking_uri=self.tracking_uri)
            cached = (self.run_id, repository)
            self._repository = cached
        return cached[1]

    def download(self, artifact_path: str, dst_dir: str | Path) -> Path:
        """One file, by one request: the store's own file download (`_download_file`, which every MLflow
        artifact store has) skips `download_artifacts`' listing request, which asks whether the path is a folder."""
        relative = contract.relative_artifact_path(artifact_path)  # refuses paths that would leave dst_dir
        target = Path(dst_dir) / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        self._artifact_repository()._download_file(relative.as_posix(), str(target))
        return target

    def fetch(self, artifact_path: str) -> bytes | None:
        """One file into memory by one GET, where the tracking server serves the run's store over HTTP
        (`mlflow-artifacts:`, proxied to a folder or a bucket): with the credentials, TLS settings and retries of
        MLflow's own requests (`http_request`), as the store's `_download_file` makes it, minus the copy on disk.
        None for other stores (a bucket read directly, a local folder): those are downloaded or read in place."""
        from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import augmented_raise_for_status, http_request

        repository = self._artifact_repository()
        if not isinstance(repository, HttpArtifactRepository):
            return None
        relative = contract.relative_artifact_path(artifact_path).as_posix()  # refuses paths that leave the run
        response = http_request(get_default_host_creds(repository.artifact_uri), f"/{relative}", "GET", stream=True)
        with response:
            augmented_raise_for_status(response)
            # The whole body in one read: a third of the CPU of `iter_content`'s chunks, on a core the server shares.
            return response.raw.read(decode_content=True)

    def local_file(self, artifact_path: str) -> Path | None:
        """In place where the run's artifact store is a local folder (a `file:` URI or a plain path, as a
        sqlite tracking URI's `./mlruns`); a store behind a server is downloaded even when the server runs here."""
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        repository = self._artifact_repository()
        if not isinstance(repository, LocalArtifactRepository):
            return None
        path = Path(repository.artifact_dir) / contract.relative_artifact_path(artifact_path)
        return path if path.is_file() else None

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
        return f"{self._run_info().artifact_uri}/{artifact_path}"

    def ui_url(self, artifact_path: str) -> str | None:
        """The file in the run's artifact view of the MLflow UI, for a server URI. The link selects the
        model-training view (`workflowType`), which MLflow 3.17's UI does not take from the experiment's kind."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        experiment_id = self._run_info().experiment_id
        return (f"{redact(self.tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{self.run_id}"
                f"/artifacts/{artifact_path}?workflowType=machine_learning")
