"""What a tracking backend is: a writer for training, a reader for the post-hoc job.

- `RunWriter`: what a training loop needs and nothing more: start (or join) a run, log
  params and metrics, hand a finished file over for upload, finish.

  Two families of writes, one name per thing. `log_params`, `log_metrics`, `log_artifact` and
  `log_table` never wait for the network: each backend hides its own asynchrony behind them (MLflow
  queues them, in order, through the run's spool folder, so an outage costs no write; W&B offline
  writes to local disk), and `finish` waits for them, bounded, and raises or warns naming what did not
  land. Training (recorders, callbacks, loops) writes through them. `write_params`, `write_metrics`,
  `write_artifact`, `write_artifacts`, `write_dataset`, `write_samples`, `write_scatter` and `set_tags`
  return once the backend has the write and raise when it does not: the post-hoc job and commands
  (`analyze`, `compare`, `select`) use them, since their files are temporary and the job may mark a
  run done only once its scores are there.
- `RunReader`: what the post-hoc job reads back: attach to a run, list and download its
  files, read its params and tags, find an experiment's runs.
- `Tracker`: one backend, both halves, plus `job_lock` (see `tracking.backends.lock`).

Backends import their package lazily, so this module and the registry import without
mlflow or wandb. The native client stays reachable through `RunWriter.native`.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from tracking.backends.uploads import Operation, SpoolClaim, Uploader, claim_spool, spool_root
from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    import pandas as pd


class _Run:
    """The run id a backend points at, set by `start` or `attach`."""

    name: ClassVar[str]
    _run_id: str | None = None

    @property
    def run_id(self) -> str:
        """Id of the run this tracker writes to and reads from."""
        if self._run_id is None:
            raise ActionScoresError("no run: call start() or attach() first")
        return self._run_id


class RunWriter(_Run, ABC):
    """The training side: everything a loop or a callback writes to a run."""

    _local_uploader: Uploader | None = None  # see `_table_uploads`
    _spool_claim: SpoolClaim | None = None  # see `spool_dir`
    # Whether processes other than the one that opened the run may attach and write files into it at once,
    # each through its own spool (`shared_run`): then every torchrun rank uploads its own part of an epoch.
    several_writers: ClassVar[bool] = False
    writer_rank = 0  # the torchrun rank writing through this writer; ranks above 0 get spool folders of their own
    # True keeps the tables (and media) a tracker has taken in the spool folder; None: `$ACTION_SCORES_KEEP_LOCAL`
    # (unset: deleted once uploaded, see `tracking.backends.uploads`). Set it on the tracker before `start`.
    keep_local: bool | None = None

    @property
    @abstractmethod
    def native(self) -> Any:
        """The backend's own client or run object, as an escape hatch."""

    @abstractmethod
    def start(self, experiment: str | None = None, run_name: str | None = None) -> str:
        """Open a new run (or the one a launcher such as `mlflow run` opened); return its id."""

    @abstractmethod
    def finish(self, failed: bool = False) -> None:
        """Close the run that `start` opened, after the writes of the `log_*` family (bounded wait)."""

    @abstractmethod
    def write_params(self, params: Mapping[str, object]) -> None:
        """Record settings of the run (values become strings) now; raises when the backend does not take them."""

    @abstractmethod
    def write_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record numeric results now (`step` None: the run's summary values)."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record mutable labels of the run (the job's status lives here)."""

    @abstractmethod
    def write_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        """Upload one file into `artifact_dir` of the run now, replacing a file of the same name."""

    def write_artifacts(self, local_dir: str | Path, artifact_dir: str) -> None:
        """Upload every file under `local_dir`, keeping the folder layout (`artifact_dir` "": the run's root)."""
        root = Path(local_dir)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = path.parent.relative_to(root).as_posix()
            self.write_artifact(path, "/".join(part for part in (artifact_dir, relative) if part not in ("", ".")))

    def write_dataset(self, local_path: str | Path, artifact_dir: str, name: str, context: str) -> None:
        """Upload a parquet table the run made for other runs to use (a selection of samples) into
        `artifact_dir`, and register it where the backend has a record of datasets: `name` names it,
        `context` says what it is for. The default uploads the file only."""
        self.write_artifact(local_path, artifact_dir)

    def write_samples(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Show a ranked set of samples natively where the backend has a view for it.

        Each row holds `image` (uint8 array), `caption` and plain columns. MLflow has no
        such view (the PNG panels are its view), so the default does nothing.
        """

    def shared_run(self) -> dict[str, Any] | None:
        """What another process needs to attach a writer of its own to this run (`several_writers`): the
        backend's name, its constructor's `options` and the `run_id`; None where the run is this process's alone."""
        return None

    def write_scatter(self, key: str, points: pd.DataFrame, x: str, y: str, title: str) -> None:
        """Show a scatter of `points` (one row per sample: `x`, `y` and the columns to hover) as the backend's
        own chart, where it has one (the data map). MLflow has none (the PNG is its view): the default does
        nothing."""

    # --- writes during training: never block the loop -----------------------------------
    @property
    def spool_dir(self) -> Path:
        """This writer's local spool folder for its run: where the recorder writes tables, kept until they are
        uploaded. `$ACTION_SCORES_SPOOL/<backend>-<run id>` (`...-rank<R>` for a torchrun rank R above 0),
        claimed on first use (`tracking.backends.uploads.claim_spool`) and held until `finish`: while another
        writer of the run holds that (a second callback in this process, another process), `...-writer<N>`."""
        return self._claimed_spool().path

    def _claimed_spool(self) -> SpoolClaim:
        """This writer's claim of its run's spool folder (see `spool_dir`), taken now if it holds none."""
        base = spool_root() / (f"{self.name}-{self.run_id}" + (f"-rank{self.writer_rank}" if self.writer_rank else ""))
        claim = self._spool_claim
        if claim is None or claim.released or claim.base != base:
            if claim is not None and not claim.owned:  # another run's, never used (an uploader releases its own)
                claim.release()
            claim = self._spool_claim = claim_spool(base)
        return claim

    def _release_spool(self) -> None:
        """Let the run's next writer take this writer's spool folder, and replay what is left there."""
        claim, self._spool_claim = self._spool_claim, None
        if claim is not None:
            claim.release()

    def log_artifact(self, local_path: str | Path, artifact_dir: str) -> None:
        """Hand a finished file over for upload without waiting for the network (`write_artifact` waits).

        Backends that write to local disk (W&B offline, a folder) just write it now; a
        network backend queues it (see `tracking.backends.uploads`) and `finish` waits for it.
        """
        self.write_artifact(local_path, artifact_dir)

    def log_table(self, path: Path, write: Callable[[], object], artifact_dir: str) -> None:
        """Hand a table over without waiting for the disk or the network: `write()` makes the file at `path`
        on the run's writer thread, which then hands it to `log_artifact` (`finish` waits for both, bounded).
        Raises `ActionScoresError` for a table handed over earlier that could not be written."""
        path = Path(path).resolve()

        def written() -> dict[str, str]:
            write()
            return {"path": str(path), "artifact_dir": artifact_dir}

        self._table_uploads().submit_after(written, "artifact", describe=f"{artifact_dir}/{path.name}")

    def _table_uploads(self) -> Uploader:
        """The run's writer (and, for a backend that writes to local disk, its copier), started on first use.
        A network backend overrides this with its own uploader, which also queues its uploads."""
        uploader = self._local_uploader
        if uploader is None or uploader.spool != self.spool_dir:
            if uploader is not None:
                uploader.close()
            record = {"backend": self.name, "run_id": self.run_id, "tracking_uri": ""}
            uploader = Uploader(self._claimed_spool(), record, lambda operation, maybe_done: self.log_artifact(
                operation.payload["path"], operation.payload["artifact_dir"]), self._keeps_handed_over_files())
            self._local_uploader = uploader
        return uploader

    def _keeps_handed_over_files(self) -> bool | None:
        """`keep_local` of the writer thread's uploader: a backend whose `log_artifact` only queues the file
        (to another uploader, which reads it later) keeps it whatever the setting."""
        return self.keep_local

    def _close_table_uploads(self) -> list[str]:
        """Wait (bounded, `$ACTION_SCORES_UPLOAD_WAIT`) for the tables handed to `log_table`; return those
        that could not be made or handed on, each with its reason (the run then ends FAILED)."""
        uploader, self._local_uploader = self._local_uploader, None
        if uploader is None:
            self._release_spool()
            return []
        left = uploader.close()
        self._release_spool()
        return uploader.unwritten + [f"{op.describe}: {uploader.last_error}" for op in left] + [
            f"{op.describe}: {why}" for op, why in uploader.refused]

    def log_params(self, params: Mapping[str, object]) -> None:
        """`write_params` without waiting for the network (a network backend queues it with its uploads)."""
        self.write_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """`write_metrics` of epoch `step` without waiting for the network, in order with `log_artifact`."""
        self.write_metrics(metrics, step)

    def upload_spool(self, spool: Path, run_id: str | None = None) -> list[Operation]:
        """Perform the writes a training process left in `spool` (`action-scores upload`), attached
        to the spool's run (`run_id`: refuse a spool of another run); returns what was done.

        Only a backend whose `log_*` family queues writes leaves a spool; the others say so.
        """
        raise ActionScoresError(
            f"{spool}: the {self.name} tracker writes straight to its runs and spools nothing, "
            "so there is nothing for `action-scores upload` to do"
        )


class RunReader(_Run, ABC):
    """The post-hoc side: everything the job reads from a run that training wrote."""

    @abstractmethod
    def attach(self, run_id: str) -> None:
        """Point at an existing run; unknown ids are an error."""

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

    def local_file(self, artifact_path: str) -> Path | None:
        """The file itself, where the run's store is a folder on this machine, so the job reads it in place
        instead of copying it; None where it must be downloaded (a server, a bucket) or is not there."""
        return None

    def fetch(self, artifact_path: str) -> bytes | None:
        """The file's bytes, fetched straight into memory where the backend can do that in one request (a store
        served over HTTP), so the job never writes a copy to disk; None where it cannot: the caller downloads
        the file (`download`) instead."""
        return None

    @abstractmethod
    def find_runs(self, experiment: str) -> list[str]:
        """Ids of the finished runs of an experiment, newest first."""

    @abstractmethod
    def artifact_uri(self, artifact_path: str) -> str:
        """Where a file of the run can be found, for telling the user."""

    def ui_url(self, artifact_path: str) -> str | None:
        """A link that opens the file in the backend's web UI, or None where there is no UI to open."""
        return None


class Tracker(RunWriter, RunReader):
    """One backend: a run written during training and read (then written back) by the job."""

    # Whether several jobs may run at once in one process, each on a shallow copy of the tracker
    # (`analyze --experiment --workers`): its own attached run, the shared client.
    concurrent_jobs: ClassVar[bool] = False

    @contextmanager
    def job_lock(self) -> Iterator[None]:
        """Hold the run for one post-hoc job, so that two jobs never write it at once.

        The default holds nothing. MLflow runs are locked with a tag (`tracking.backends.lock.tag_lock`),
        W&B offline runs with a file beside their folders (`tracking.backends.lock.file_lock`).
        """
        yield


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
