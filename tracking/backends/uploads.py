"""Durable background uploads: a tracking outage never blocks or kills training.

Every write that training makes while it runs (an epoch's table, an epoch's metrics, the
run's end) becomes an *operation*: a small JSON file in the run's spool folder
(`pending/00000001.json`, ...), next to the tables themselves. One thread per run
performs the operations in order, retrying with exponential backoff while the tracker
is unreachable, and deletes each file once it is done. The run's end waits a bounded
time for the queue to drain; whatever is left stays on disk, and

    action-scores upload --spool <folder>

performs it later (idempotent: a table replaces the file of the same name, metrics
already in the run's history are not logged again). A new process on the same run
(resumed training) picks the leftover operations up first, except the earlier process's
end of run: the new process ends the run itself.

A table can also be handed over before it is written (`Uploader.submit_after`): a second
thread writes it into the spool, then queues its upload, so that the training thread pays
for neither the disk nor the network. That thread never waits for the tracker, so an outage
keeps tables on disk, not in memory; a table handed over when the process dies is lost with
the epoch, as it would be mid-write. At most `MAX_QUEUED_TABLES` (`$ACTION_SCORES_WRITE_QUEUE`)
tables wait for it; a hand-over past that waits for room (`Uploader.table_waits` counts those).
A table it cannot make is raised at the next hand-over, and the run's end is then queued as
FAILED: a run with a gap never ends FINISHED.

Operations are numbered after every file in `pending/` and `failed/`, so a resumed process never
overwrites a write set aside by an earlier one. The run's end waits at most
`$ACTION_SCORES_UPLOAD_WAIT` seconds in all, for the writer thread and the queue together; then
both threads stop at once, and `action-scores upload` takes over from the files.

A write the tracker refuses for good (`UploadRefused`: the run deleted, no permission, a
spooled table gone) is not retried: it is moved to `failed/`, the writes behind it go on,
and the run's end names it. `action-scores upload` tries `failed/` again with `pending/`,
once the cause is fixed. An operation file that cannot be read is set aside the same way.

Once the tracker has a table (or a media file) of the spool folder, the file is deleted: a long run
would otherwise leave its every epoch there (1M samples x 100 epochs: 0.35 to 1.45 GB per split).
`keep_local=True` on the tracker, or `$ACTION_SCORES_KEEP_LOCAL=1`, keeps them. Only files inside the
run's spool folder are deleted, never a file handed over from elsewhere, and not while a later write
(a re-recorded epoch) still names it; a refused or failed write keeps its file.

Spool folder: `$ACTION_SCORES_SPOOL/<backend>-<run id>/`, by default under the system's
temporary folder (`/tmp/action-scores-spool/...`). One writer holds a spool folder at a time (`claim_spool`:
an exclusive `flock` on its `writer.lock`, which the kernel frees when the holder exits, however it exits):
a second writer on the same run, in this process (two callbacks, one per split) or in another, gets
`<backend>-<run id>-writer<N>/` of its own, so that no two queues number their operations in one folder.
The run's own folder, when claimed, takes over the leftovers of the `-writer<N>` folders beside it that no
writer holds (a resumed process), and `action-scores upload` performs them with its own.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracking.errors import ActionScoresError

log = logging.getLogger(__name__)

SPOOL_ENV = "ACTION_SCORES_SPOOL"
WAIT_ENV = "ACTION_SCORES_UPLOAD_WAIT"  # seconds the run's end waits for the queue (default 300)
BACKOFF_ENV = "ACTION_SCORES_UPLOAD_BACKOFF"  # longest pause between two tries, seconds (default 30)
KEEP_LOCAL_ENV = "ACTION_SCORES_KEEP_LOCAL"  # 1: uploaded tables stay in the spool folder (default: deleted)
WRITE_QUEUE_ENV = "ACTION_SCORES_WRITE_QUEUE"  # tables that may wait for the writer thread (default below)
MAX_QUEUED_TABLES = 4  # each holds an epoch's arrays: past this, a hand-over waits for the writer
PENDING = "pending"
FAILED = "failed"  # refused writes and unreadable operation files, set aside
RUN_FILE = "run.json"
CLAIM_FILE = "writer.lock"  # flock'ed by the one writer that holds the spool folder; names it
WRITER_SUFFIX = "-writer"  # `<backend>-<run id>-writer<N>`: the folder of a run's N-th writer at once


class UploadRefused(ActionScoresError):
    """A write the tracker will never take, however often it is tried (raised by `perform`)."""


def spool_root() -> Path:
    """Where every run's spool folder lives: `$ACTION_SCORES_SPOOL`, else `<temp>/action-scores-spool`."""
    return Path(os.environ.get(SPOOL_ENV) or Path(tempfile.gettempdir()) / "action-scores-spool")


class SpoolInUse(ActionScoresError):
    """A spool folder that another writer holds (`claim_spool(..., exact=True)`)."""


class SpoolClaim:
    """One writer's hold on one spool folder: an open, exclusively `flock`ed `writer.lock` inside it.

    `flock` belongs to the open file, so a second claim of the folder fails in this process as in any other,
    and the kernel frees it when the process exits. `release` (idempotent; also when the claim is garbage
    collected) lets the next writer take the folder and replay what is left in it."""

    def __init__(self, base: Path, path: Path, descriptor: int) -> None:
        self.base = base  # the run's own folder, `<backend>-<run id>[-rank<R>]`
        self.path = path  # the folder held: `base`, or `base-writer<N>` when another writer holds `base`
        self.owned = False  # an `Uploader` works in it: that uploader's `close` releases it
        self._finalizer = weakref.finalize(self, os.close, descriptor)

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    @property
    def is_base(self) -> bool:
        """Whether this is the run's own folder, which also takes over its free `-writer<N>` siblings."""
        return self.path == self.base

    def release(self) -> None:
        self._finalizer()


def writer_folders(base: Path) -> list[Path]:
    """The `base-writer<N>` folders beside `base`, by N: where other writers of its run put their writes."""
    pattern = re.compile(re.escape(base.name + WRITER_SUFFIX) + r"(\d+)")
    found = [(int(match.group(1)), folder) for folder in base.parent.glob(base.name + WRITER_SUFFIX + "*")
             if (match := pattern.fullmatch(folder.name)) and folder.is_dir()]
    return [folder for _, folder in sorted(found)]


def claim_spool(base: Path, exact: bool = False) -> SpoolClaim:
    """Hold the spool folder `base` for one writer, or, while another writer holds it (in this process or
    another), the first free `base-writer<N>` (N = 2, 3, ...); the folder is made if missing.

    `exact`: hold `base` itself or raise `SpoolInUse` naming the holder (`<host>:<pid>`)."""
    import fcntl

    for number in itertools.count(1):
        folder = base if number == 1 else base.with_name(f"{base.name}{WRITER_SUFFIX}{number}")
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "a writer"
            os.close(descriptor)
            if exact:
                raise SpoolInUse(f"{folder} is held by a writer that is still running ({holder}, {CLAIM_FILE}); "
                                 "run this again once it has finished") from None
            continue
        except BaseException:
            os.close(descriptor)
            raise
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        return SpoolClaim(base, folder, descriptor)
    raise AssertionError("unreachable")


def _seconds(env: str, default: float) -> float:
    value = os.environ.get(env, "")
    try:
        return float(value) if value else default
    except ValueError:
        raise ActionScoresError(f"{env} must be a number of seconds, got {value!r}") from None


def keeps_local(keep_local: bool | None) -> bool:
    """Whether uploaded files stay in the spool: `keep_local` when given, else `$ACTION_SCORES_KEEP_LOCAL`."""
    if keep_local is not None:
        return bool(keep_local)
    value = os.environ.get(KEEP_LOCAL_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ActionScoresError(f"{KEEP_LOCAL_ENV} must be 1 (keep uploaded tables in the spool) or 0, got {value!r}")


def _count(env: str, default: int) -> int:
    value = os.environ.get(env, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ActionScoresError(f"{env} must be a whole number of tables, at least 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Operation:
    """One queued write, persisted as `pending/<seq>.json` until it is done."""

    file: Path
    kind: str  # "artifact", "params", "metrics" or "end"
    payload: dict[str, Any]

    @property
    def spool(self) -> Path:
        """The spool folder the operation's file lies in (`<spool>/pending/` or `<spool>/failed/`)."""
        return self.file.parent.parent

    @property
    def describe(self) -> str:
        if self.kind == "artifact":
            return f"{self.payload['artifact_dir']}/{Path(self.payload['path']).name}"
        if self.kind == "metrics":
            return f"metrics of step {self.payload['step']}"
        if self.kind == "params":
            return f"params {', '.join(sorted(self.payload['params']))}"
        return f"end of run ({self.payload['status']})"

    def spooled_file(self, spool: Path) -> Path | None:
        """The file this write uploads when it lies inside `spool` (the spool's own copy, deletable once
        uploaded); None for any other write, and for a file handed over from elsewhere (the user's)."""
        if self.kind != "artifact" or not self.payload.get("path"):
            return None
        path = Path(self.payload["path"]).resolve()
        return path if path.is_relative_to(spool.resolve()) else None


def delete_uploaded(spool: Path, done: Operation, later: list[Operation], writing: Collection[str] = ()) -> None:
    """Delete the spool's file of the write `done` (already performed, its operation file gone), unless a `later`
    write names the same file or the writer thread is making it again (`writing`: their `describe`)."""
    path = done.spooled_file(spool)
    if path is None or done.describe in writing or any(op.spooled_file(spool) == path for op in later):
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as error:  # the write is done: a file left behind costs disk, not data
        log.warning("could not delete the uploaded %s (%s); delete it by hand", path, error)


def pending_operations(spool: Path, include_failed: bool = False) -> list[Operation]:
    """The operations still to do in a spool folder, oldest first (`include_failed`: with the
    set-aside ones, in their place in the order). A file that is not a readable operation
    (truncated by a crash of the disk or a hand edit) is set aside with a warning."""
    files = list((spool / PENDING).glob("*.json"))
    if include_failed:
        files += (spool / FAILED).glob("*.json")
    operations = []
    for file in sorted(files, key=lambda file: file.name):  # names are the global sequence
        try:
            record = json.loads(file.read_text())
            operations.append(Operation(file, record.pop("kind"), record))
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            unreadable = set_aside(spool, file, ".unreadable")
            log.warning("upload operation %s is unreadable (%s: %s); moved to %s", file, type(error).__name__,
                        error, unreadable)
    return operations


def set_aside(spool: Path, file: Path, suffix: str = "") -> Path:
    """Move an operation file to the spool's `failed/` folder; returns where it now is."""
    (spool / FAILED).mkdir(exist_ok=True)
    target = spool / FAILED / (file.name + suffix)
    os.replace(file, target)
    return target


def read_run_record(spool: Path) -> dict[str, str]:
    """`run.json` of a spool folder: backend, run id and (credential-free) tracking URI."""
    path = spool / RUN_FILE
    if not path.is_file():
        raise ActionScoresError(f"{spool} is not an action-scores spool folder (no {RUN_FILE} inside)")
    return json.loads(path.read_text())


class Uploader:
    """The one background thread of a run that performs its queued writes in order, and the one writer
    thread that makes its tables first.

    `perform(operation)` does one write against the tracker and raises on any failure;
    the thread then waits (0.5 s, doubling up to `$ACTION_SCORES_UPLOAD_BACKOFF`) and
    tries the same operation again, so later ones never overtake it. At most
    `$ACTION_SCORES_WRITE_QUEUE` tables (default `MAX_QUEUED_TABLES`) wait for the writer thread:
    a hand-over beyond that waits (bounded, counted in `table_waits`), since each queued table
    holds its epoch's arrays.
    """

    def __init__(self, spool: Path | SpoolClaim, run_record: Mapping[str, str],
                 perform: Callable[[Operation, bool], None], keep_local: bool | None = None) -> None:
        """`spool`: a writer's claim (`claim_spool`), which this uploader then holds until `close`, or a folder,
        claimed here (`SpoolInUse` when another writer holds it: two queues in one folder would overwrite each
        other's operation files). `perform` must leave the tracker holding the file of an artifact write when it
        returns: the file is then deleted from the spool, unless `keep_local` (None: `$ACTION_SCORES_KEEP_LOCAL`)."""
        keep = keeps_local(keep_local)  # a bad value is an error before anything is claimed
        self._claim = spool if isinstance(spool, SpoolClaim) else claim_spool(spool, exact=True)
        if self._claim.released:
            raise ActionScoresError(f"{self._claim.path}: this writer's claim of its spool folder was released")
        self._claim.owned = True
        self.spool = self._claim.path
        self.keep_local = keep
        (self.spool / PENDING).mkdir(parents=True, exist_ok=True)
        (self.spool / RUN_FILE).write_text(json.dumps(dict(run_record), indent=1))
        self._perform = perform
        self._max_backoff = _seconds(BACKOFF_ENV, 30.0)
        self._wait = _seconds(WAIT_ENV, 300.0)  # read now: a bad value is an error at the start, not the end
        self._max_tables = _count(WRITE_QUEUE_ENV, MAX_QUEUED_TABLES)
        self._lock = threading.Condition()
        self._queue = pending_operations(self.spool)  # leftovers of an earlier process on this run come first,
        self._adopted = self._adopt_free_writer_folders()  # with those of its other writers' folders...
        self._queue += [op for claim in self._adopted for op in pending_operations(claim.path)]
        for stale in [op for op in self._queue if op.kind == "end"]:  # ...but this process ends the run
            self._queue.remove(stale)
            stale.file.unlink(missing_ok=True)
            log.info("dropped the earlier process's %s from %s: this process ends the run", stale.describe, stale.spool)
        self.refused: list[tuple[Operation, str]] = []  # set aside in failed/, with the tracker's reason
        self._replayed = {op.file for op in self._queue}
        # Numbered after every file an earlier process left, refused ones included: none is ever overwritten.
        self._next = max((int(file.stem.split(".")[0]) for folder in (PENDING, FAILED)
                          for file in (self.spool / folder).glob("*.json*") if file.stem.split(".")[0].isdigit()),
                         default=0) + 1
        self._closing = False
        self._abandoned = False  # set by close() on timeout: both threads stop at once
        self.last_error = ""
        self.unwritten: list[str] = []  # tables the writer thread could not make, with the reason
        self._unreported = 0  # how many of `unwritten` no hand-over has raised yet
        self._tables: list[tuple[Callable[[], Mapping[str, Any]], str, str]] = []  # waiting for the writer thread
        self._writing = ""  # the table the writer thread is making now
        self.end_status = ""  # the status `close` queued for the run's end
        self.table_waits = 0  # hand-overs that found the writer queue full and waited
        self._writer = threading.Thread(target=self._write_tables, name=f"action-scores-write-{self.spool.name}",
                                        daemon=True)
        self._thread = threading.Thread(target=self._work, name=f"action-scores-upload-{self.spool.name}",
                                        daemon=True)
        self._writer.start()
        self._thread.start()

    def _adopt_free_writer_folders(self) -> list[SpoolClaim]:
        """The claims of the `-writer<N>` folders beside the run's own folder that no writer holds and that
        still hold writes (an earlier process's second writer): this queue performs them after its own."""
        if not self._claim.is_base:
            return []
        adopted = []
        for folder in writer_folders(self.spool):
            if not any((folder / PENDING).glob("*.json")):
                continue
            try:
                adopted.append(claim_spool(folder, exact=True))
            except SpoolInUse:  # a writer of this run still running: its own queue does them
                continue
            log.info("taking over the writes left in %s", folder)
        return adopted

    def submit(self, kind: str, **payload: Any) -> None:
        """Persist one operation, then queue it; returns at once."""
        with self._lock:
            file = self.spool / PENDING / f"{self._next:08d}.json"
            self._next += 1
            temporary = file.with_suffix(".tmp")
            temporary.write_text(json.dumps({"kind": kind, **payload}))
            os.replace(temporary, file)  # never a half-written operation on disk
            self._queue.append(Operation(file, kind, payload))
            self._lock.notify_all()

    def submit_after(self, make: Callable[[], Mapping[str, Any]], kind: str, describe: str) -> None:
        """Queue the operation whose payload `make` returns, after running `make` on the writer thread
        (it writes the file the payload names); returns at once, unless `$ACTION_SCORES_WRITE_QUEUE`
        tables already wait (then it waits for one, at most `$ACTION_SCORES_UPLOAD_WAIT` s).

        Raises `ActionScoresError` for a table the writer thread could not make since the last
        hand-over (`describe` names it), or when the writer thread makes no room in time."""
        with self._lock:
            self._raise_unwritten()
            if len(self._tables) >= self._max_tables:
                self.table_waits += 1
                deadline = time.monotonic() + self._wait
                while len(self._tables) >= self._max_tables and time.monotonic() < deadline:
                    self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
                if len(self._tables) >= self._max_tables:
                    raise ActionScoresError(
                        f"{len(self._tables)} table(s) of {self.spool} still wait for the writer thread after "
                        f"{self._wait:g} s ({WAIT_ENV}): the disk under the spool is stuck or full")
            self._tables.append((make, kind, describe))
            self._lock.notify_all()

    def _raise_unwritten(self) -> None:
        """Raise (once) for tables the writer thread could not make: the caller's run is not whole."""
        if self._unreported:
            failed, self._unreported = self.unwritten[-self._unreported:], 0
            raise ActionScoresError(f"could not write {'; '.join(failed)}; the run will end FAILED. Free space in "
                                    f"the spool's disk (or point ${SPOOL_ENV} elsewhere) and record those epochs again")

    def wait_for_writes(self, deadline: float) -> bool:
        """Wait, until `deadline` (`time.monotonic()`), for every table handed to `submit_after` to be written
        and queued (or named in `unwritten`), so that an operation submitted next comes after them: the run's
        end, above all. False when the writer thread did not finish in time."""
        with self._lock:
            while (self._tables or self._writing) and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, deadline - time.monotonic()))
            return not (self._tables or self._writing)

    def _write_tables(self) -> None:
        while True:
            with self._lock:
                while not self._tables and not self._closing and not self._abandoned:
                    self._lock.wait()
                if self._abandoned or not self._tables:
                    return
                make, kind, describe = self._tables.pop(0)
                self._writing = describe
            failure = ""
            try:
                self.submit(kind, **make())
            except Exception as error:  # the disk, not the tracker: retrying would not help
                log.error("could not write %s (%s: %s); it is not uploaded", describe, type(error).__name__, error)
                failure = f"{describe}: {type(error).__name__}: {str(error)[:300]}"
            with self._lock:
                if failure:
                    self.unwritten.append(failure)
                    self._unreported += 1
                self._writing = ""
                self._lock.notify_all()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing and not self._abandoned:
                    self._lock.wait()
                if self._abandoned or not self._queue:  # abandoned: `action-scores upload` takes over
                    return
                operation = self._queue[0]
            pause, uploaded = 0.5, False
            while True:
                try:
                    # A retried (or replayed) write may have reached the tracker before it failed.
                    self._perform(operation, operation.file in self._replayed)
                    operation.file.unlink(missing_ok=True)  # before its table: a crash then leaves a table, not a gap
                    uploaded = True
                    break
                except UploadRefused as error:  # retrying cannot help; the writes behind it go on
                    where = set_aside(operation.spool, operation.file)
                    self.refused.append((operation, str(error)))
                    log.warning("%s: %s; set aside in %s", operation.describe, error, where)
                    break
                except Exception as error:  # any failure of the network or the server: try again later
                    self._replayed.add(operation.file)
                    self.last_error = f"{type(error).__name__}: {str(error)[:300]}"
                    first_try = pause == 0.5  # say so once per write, not at every retry
                    log.log(logging.WARNING if first_try else logging.DEBUG, "upload of %s failed (%s); retrying",
                            operation.file.name, self.last_error)
                    with self._lock:  # a pause that close() giving up cuts short
                        self._lock.wait_for(lambda: self._abandoned, timeout=pause)
                        if self._abandoned:
                            return
                    pause = min(pause * 2, self._max_backoff)
            with self._lock:
                if uploaded and not self.keep_local:  # the writer thread may be making it again (a resumed epoch)
                    delete_uploaded(operation.spool, operation, self._queue[1:],
                                    {self._writing, *(table[2] for table in self._tables)})
                self._queue.pop(0)
                self._lock.notify_all()

    def close(self, end_status: str | None = None, timeout: float | None = None) -> list[Operation]:
        """Wait up to `timeout` seconds in all (default `$ACTION_SCORES_UPLOAD_WAIT`, 300) for the writer
        thread's tables, then for the queue to drain; return the operations left undone (still on disk).

        `end_status`: queue the run's end after the last table, as FAILED instead when a table is missing
        (not made, or not made in time: named in `unwritten`), so that a run with a gap never ends FINISHED.
        `end_status` then says what was queued. Both threads stop at once when the time is up."""
        deadline = time.monotonic() + (self._wait if timeout is None else timeout)
        written = self.wait_for_writes(deadline)  # local disk: its tables join the queue before the end
        with self._lock:
            if not written:
                self.unwritten += [f"{describe}: not written within the wait ({WAIT_ENV})"
                                   for describe in [self._writing, *(table[2] for table in self._tables)]]
                self._abandoned = True  # the writer stops before its next table
        if end_status is not None:
            self.end_status = "FAILED" if self.unwritten else end_status
            self.submit("end", status=self.end_status)
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            while self._queue and time.monotonic() < deadline:
                self._lock.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            self._abandoned = True  # done or given up: either way neither thread performs anything more
            self._lock.notify_all()
            left = list(self._queue)
        for thread in (self._thread, self._writer):  # a write already in flight ends with its own timeout
            thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.1)
        for claim in (self._claim, *self._adopted):  # the next writer of the run takes the folders, leftovers too
            claim.release()
        return left


def unwritten_error(run_id: str, unwritten: list[str]) -> ActionScoresError:
    """What `finish` raises for a run that ended FAILED because tables handed to it are missing."""
    return ActionScoresError(f"run {run_id} ended FAILED: {len(unwritten)} table(s) could not be written "
                             f"({'; '.join(unwritten[:3])}{' ...' if len(unwritten) > 3 else ''}); record those "
                             "epochs again (resume the run with the same id)")


def left_behind_message(spool: Path, operations: list[Operation], last_error: str, tracking_uri: str,
                        refused: list[tuple[Operation, str]] = (), unwritten: list[str] = ()) -> str:
    """What the end of a run says about writes the tracker did not take (in time, or at all), and
    tables that never reached the disk."""
    parts = []
    if unwritten:
        parts.append(f"{len(unwritten)} table(s) could not be written to {spool} and are missing from the run "
                     f"({'; '.join(unwritten[:3])}{' ...' if len(unwritten) > 3 else ''})")
    if operations:
        tables = [op.describe for op in operations if op.kind == "artifact"]
        parts.append(
            f"the tracker at {tracking_uri} did not take {len(operations)} pending write(s) in time "
            f"({len(tables)} table(s): {', '.join(tables[:5])}{' ...' if len(tables) > 5 else ''}; last error: "
            f"{last_error or 'none'}). They are kept in {spool}"
        )
    if refused:
        reasons = "; ".join(f"{op.describe}: {why}" for op, why in refused[:3]) + (" ..." if len(refused) > 3 else "")
        parts.append(f"the tracker at {tracking_uri} refused {len(refused)} write(s) ({reasons}). "
                     f"They are set aside in {spool / FAILED}; fix the cause first")
    if not operations and not refused:
        return ". ".join(parts) + ": free space in the spool's disk (or point $ACTION_SCORES_SPOOL elsewhere)"
    when = "once the server is back" if not refused else "then"
    return ". ".join(parts) + f". Upload them {when} with:\n    action-scores upload --spool {spool} --tracking-uri {tracking_uri}"


def replay(spool: Path, perform: Callable[[Operation, bool], None], keep_local: bool | None = None) -> list[Operation]:
    """Perform a spool folder's pending and set-aside operations in order, once each, with those of its
    `-writer<N>` folders (the run's other writers) after them and the end of the run last
    (`action-scores upload`).

    Every folder is claimed first: one that a running writer holds is refused (`SpoolInUse`), since its
    queue is still at work. Stops at the first failure, naming it; what was done is removed from the spool
    (its uploaded files too, unless `keep_local`, None: `$ACTION_SCORES_KEEP_LOCAL`), so running it again
    goes on from there.
    """
    keep = keeps_local(keep_local)
    done: list[Operation] = []
    claims: list[SpoolClaim] = []
    try:
        for folder in [spool, *writer_folders(spool)]:
            claims.append(claim_spool(folder, exact=True))
        found = [op for claim in claims for op in pending_operations(claim.path, include_failed=True)]
        operations = [op for op in found if op.kind != "end"] + [op for op in found if op.kind == "end"]
        for position, operation in enumerate(operations):
            try:
                perform(operation, True)
            except ActionScoresError as error:
                raise ActionScoresError(f"{operation.describe} from {operation.spool}: {error}") from None
            except Exception as error:  # the tracker's own connection and HTTP errors
                raise ActionScoresError(
                    f"could not upload {operation.describe} from {operation.spool} ({type(error).__name__}: "
                    f"{str(error)[:300]}); {len(done)} write(s) done, the rest kept: run the command again"
                ) from None
            operation.file.unlink(missing_ok=True)
            if not keep:
                delete_uploaded(operation.spool, operation, operations[position + 1:])
            done.append(operation)
    finally:
        for claim in claims:
            claim.release()
    return done
