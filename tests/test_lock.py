"""`tracking.backends.lock` on its own: when a lock tag is stale, and what `tag_lock` does with each
holder. A run's tags are a dict behind the three functions a backend supplies (MLflow's own are
exercised by tests/test_job_lock.py with real processes)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tracking.backends.lock import DEFAULT_TTL_SECONDS, file_lock, stale, tag_lock
from tracking.errors import ActionScoresError

HOST = socket.gethostname()
RUN = "run0"


def _held(host: str, pid: int, age_seconds: float) -> str:
    """A lock value as `tag_lock` writes it, `age_seconds` old."""
    since = datetime.now(timezone.utc) - timedelta(seconds=age_seconds)
    return f"{host}:{pid}:cafe0123 {since.isoformat(timespec='seconds')}"


def _dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


class Tags:
    """One run's lock tag; `thief` (if set) overwrites it right after our write, as a second job would."""

    def __init__(self, value: str | None = None, thief: str | None = None) -> None:
        self.value, self.thief, self.writes = value, thief, []

    def read(self) -> str | None:
        return self.value

    def write(self, value: str) -> None:
        self.writes.append(value)
        self.value = self.thief or value

    def delete(self) -> None:
        self.value = None


def _lock(tags: Tags) -> AbstractContextManager[None]:
    return tag_lock(RUN, tags.read, tags.write, tags.delete, settle_seconds=0)


def test_a_live_job_of_this_host_holds_its_lock() -> None:
    assert not stale(_held(HOST, os.getpid(), 0))


def test_a_dead_job_of_this_host_leaves_a_stale_lock() -> None:
    assert stale(_held(HOST, _dead_pid(), 0))


def test_a_job_of_another_host_holds_its_lock_until_the_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACTION_SCORES_LOCK_TTL", raising=False)
    assert not stale(_held("elsewhere", 1, DEFAULT_TTL_SECONDS - 60))
    assert stale(_held("elsewhere", 1, DEFAULT_TTL_SECONDS + 60))
    monkeypatch.setenv("ACTION_SCORES_LOCK_TTL", "60")
    assert not stale(_held("elsewhere", 1, 30))
    assert stale(_held("elsewhere", 1, 120))
    assert stale(_held(HOST, os.getpid(), 120))  # even a live job of this host, past the TTL


@pytest.mark.parametrize("value", ["held by hand", "", "host:1:x yesterday"])
def test_a_tag_this_library_did_not_write_is_stale(value: str) -> None:
    assert stale(value)


def test_a_live_holder_is_named_and_nothing_is_written() -> None:
    holder = _held(HOST, os.getpid(), 0)
    tags = Tags(holder)
    with pytest.raises(ActionScoresError) as error, _lock(tags):
        pytest.fail("the block must not run")
    assert str(error.value).startswith(
        f"run {RUN} is being analysed by another job (action_scores.lock = {holder!r}); try again when it has finished"
    )
    assert (tags.value, tags.writes) == (holder, [])


@pytest.mark.parametrize("left", [None, "held by hand", _held("elsewhere", 1, DEFAULT_TTL_SECONDS + 60)])
def test_the_lock_is_held_during_the_block_and_removed_after(left: str | None) -> None:
    tags = Tags(left)
    with _lock(tags):
        assert re.fullmatch(rf"{re.escape(HOST)}:{os.getpid()}:[0-9a-f]{{8}} \S+", tags.value)
        mine = tags.value
    assert tags.value is None and tags.writes == [mine]


def test_the_lock_is_removed_when_the_block_fails() -> None:
    tags = Tags()
    with pytest.raises(ZeroDivisionError), _lock(tags):
        1 / 0
    assert tags.value is None and len(tags.writes) == 1


def test_a_job_that_took_the_tag_at_the_same_moment_keeps_it() -> None:
    other = _held("elsewhere", 2, 0)
    tags = Tags(thief=other)
    with pytest.raises(ActionScoresError, match=rf"run {RUN}: another job took it at the same moment "
                                                rf"\(action_scores.lock = {re.escape(repr(other))}\); it does the work"):
        with _lock(tags):
            pytest.fail("the block must not run")
    assert tags.value == other  # the winner's tag is left alone


def test_a_refused_write_is_the_backend_s_own_error() -> None:
    def refuse(value: str) -> None:
        raise ActionScoresError("permission denied: needs EDIT")

    with pytest.raises(ActionScoresError, match="^permission denied: needs EDIT$"), \
            tag_lock(RUN, lambda: None, refuse, lambda: None, settle_seconds=0):
        pytest.fail("the block must not run")


def test_a_job_running_past_the_ttl_renews_its_lock_and_is_not_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTION_SCORES_LOCK_TTL", "4")  # renewed every second
    tags = Tags()
    with _lock(tags):
        time.sleep(5.5)  # past the TTL
        assert not stale(tags.value)
        with pytest.raises(ActionScoresError, match=f"^run {RUN} is being analysed by another job"), _lock(tags):
            pytest.fail("a second job must not run")
        renewals = len(tags.writes)
    assert renewals >= 4 and tags.value is None
    time.sleep(1.5)
    assert len(tags.writes) == renewals  # the heartbeat stopped with the block


def test_a_dead_holder_s_lock_is_taken_over() -> None:
    tags = Tags(_held(HOST, _dead_pid(), 0))
    with _lock(tags):
        assert tags.value.startswith(f"{HOST}:{os.getpid()}:")
    assert tags.value is None


def test_a_file_lock_names_its_holder_to_a_second_job_and_is_free_after(tmp_path: Path) -> None:
    path = tmp_path / ".action-scores-r1.lock"
    with file_lock("r1", path):
        holder = path.read_text()
        assert re.fullmatch(rf"{re.escape(socket.gethostname())}:{os.getpid()} \S+", holder)
        with pytest.raises(ActionScoresError, match=rf"^run r1 is being analysed by another job \({re.escape(holder)} "
                                                    rf"holds {re.escape(str(path))}\); try again when it has finished"):
            with file_lock("r1", path):
                pass
    assert path.read_text() == ""
    with file_lock("r1", path):  # free again
        pass


def test_a_killed_holder_s_file_lock_is_freed_by_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / ".action-scores-r2.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from tracking.backends.lock import file_lock\n"
                               f"with file_lock('r2', Path({str(path)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ActionScoresError, match=rf":{holder.pid} "):
        with file_lock("r2", path):
            pass
    holder.kill()
    holder.wait()
    with file_lock("r2", path):  # SIGKILL left the file's text, not the lock
        pass
