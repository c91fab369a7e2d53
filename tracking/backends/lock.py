"""The post-hoc job's lock on a run: a tag that names the job holding it, or a file for a local run.

A backend without compare-and-set (MLflow) can still keep two jobs from writing one run
at once: set the tag, wait a moment, read it back; of two jobs that set it at once only
the last writer goes on. The backend supplies three small functions over its tags.
A run that is a folder on this machine (W&B offline) is held with `flock` on a file beside it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from tracking import contract
from tracking.errors import ActionScoresError

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.5  # how long a job waits before reading its tag back
DEFAULT_TTL_SECONDS = 6 * 3600


def stale(held: str) -> bool:
    """Whether a lock tag's job is gone: its process has exited (same host), or the tag is older
    than `$ACTION_SCORES_LOCK_TTL` seconds (6 h)."""
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
    return age > lock_ttl()


def lock_ttl() -> float:
    """Seconds after which a lock that was not renewed is stale: `$ACTION_SCORES_LOCK_TTL`, else 6 h."""
    ttl = os.environ.get("ACTION_SCORES_LOCK_TTL", "")
    try:
        return float(ttl) if ttl else DEFAULT_TTL_SECONDS
    except ValueError:
        raise ActionScoresError(f"ACTION_SCORES_LOCK_TTL must be a number of seconds, got {ttl!r}") from None


def _stamped(owner: str) -> str:
    return f"{owner} {datetime.now(timezone.utc).isoformat(timespec='seconds')}"


@contextmanager
def tag_lock(run_id: str, read: Callable[[], str | None], write: Callable[[str], None],
             delete: Callable[[], None], settle_seconds: float = SETTLE_SECONDS) -> Iterator[None]:
    """Hold `run_id` with the tag `action_scores.lock` = "<host>:<pid>:<nonce> <UTC time>".

    `read` returns the tag's value (None when absent), `write` sets it (raising
    `ActionScoresError` for a refusal the user must fix, anything else for a failed write),
    `delete` removes it. A lock held by another live job is an error that names it; a stale
    one (see `stale`) is taken over. While the block runs, a heartbeat thread writes the tag again
    with the time now, every quarter of the TTL, so that only a dead job's lock grows stale. The
    heartbeat stops, and the tag is removed, when the block ends.
    """
    held = read()
    if held and not stale(held):
        raise ActionScoresError(
            f"run {run_id} is being analysed by another job ({contract.LOCK_TAG} = {held!r}); "
            "try again when it has finished. If that job is gone, delete the tag (MLflow UI, or "
            f"MlflowClient().delete_tag(run_id, {contract.LOCK_TAG!r}))"
        )
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    mine = _stamped(owner)

    def taken_by_another(holder: str | None) -> ActionScoresError:
        return ActionScoresError(
            f"run {run_id}: another job took it at the same moment ({contract.LOCK_TAG} = {holder!r}); it does the work"
        )

    try:  # the job's first write, before anything is downloaded or computed
        write(mine)
    except ActionScoresError:
        raise
    except Exception:
        holder = read()
        if holder and holder != mine:  # two first inserts of the tag at once: the store kept the other's
            raise taken_by_another(holder) from None
        raise
    time.sleep(settle_seconds)
    now_held = read()
    if now_held != mine:
        raise taken_by_another(now_held)
    stop = threading.Event()
    current = [mine]  # the value last written, renewed by the heartbeat

    def renew() -> None:
        while not stop.wait(lock_ttl() / 4):
            try:
                if read() != current[0]:
                    return  # taken over or removed by hand: not ours to write again
                renewed = _stamped(owner)
                write(renewed)
                current[0] = renewed
            except Exception as error:  # the server away for a moment: the next beat tries again
                log.warning("could not renew the lock of run %s (%s: %s)", run_id, type(error).__name__, error)

    heartbeat = threading.Thread(target=renew, name=f"action-scores-lock-{run_id}", daemon=True)
    heartbeat.start()
    try:
        yield
    finally:
        stop.set()
        heartbeat.join()
        if read() == current[0]:
            delete()


@contextmanager
def file_lock(run_id: str, path: Path) -> Iterator[None]:
    """Hold `run_id` with an exclusive `flock` on `path`, for a run that is a folder on this machine (a W&B
    offline run): the kernel frees it when the holder exits, however it exits, so there is nothing to go
    stale and no heartbeat. The file names the holder ("<host>:<pid> <UTC time>"), for the error of a
    second job, which fails at once."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ActionScoresError(
                f"run {run_id} is being analysed by another job ({handle.read().strip() or 'a process'} holds "
                f"{path}); try again when it has finished"
            ) from None
        try:
            handle.truncate(0)
            handle.write(_stamped(f"{socket.gethostname()}:{os.getpid()}"))
            handle.flush()
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)
