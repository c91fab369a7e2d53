"""`Uploader` on its own, with a plain-Python `perform` (no server): numbering across processes,
ordering, refusals, bounded waits, abandoning, the bounded writer queue and its threads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tracking.backends.uploads import FAILED, PENDING, Operation, Uploader, UploadRefused
from tracking.errors import ActionScoresError

RECORD = {"backend": "plain", "run_id": "r1", "tracking_uri": "none"}


class Tracker:
    """What a tracker saw: the operations it took, in order; it refuses `refuse` and fails (retryably) while
    `down` is set; `stuck` holds every write until released."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.done: list[str] = []
        self.refuse = refuse
        self.down = threading.Event()
        self.stuck = threading.Event()

    def perform(self, operation: Operation, maybe_done: bool) -> None:
        name = operation.payload.get("name", operation.kind)
        if self.down.is_set():
            raise ConnectionError("server away")
        if name in self.refuse:
            raise UploadRefused(f"{name} refused")
        self.done.append(name)


def _uploader_threads(spool: Path) -> list[str]:
    """The live threads of the uploader on `spool` (named after it); other tests' runs may still have theirs."""
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("action-scores-")
                  and t.name.endswith(f"-{spool.name}"))


def test_operations_are_performed_in_order_and_the_end_comes_after_the_last_table(tmp_path: Path) -> None:
    tracker = Tracker()
    uploader = Uploader(tmp_path, RECORD, tracker.perform)
    slow = threading.Event()
    uploader.submit_after(lambda: slow.wait(1) or {"name": "table0"}, "artifact", "t/epoch_0000.parquet")
    uploader.submit("metrics", name="metrics0", step=0)
    assert uploader.close("FINISHED", timeout=10) == []
    assert tracker.done == ["metrics0", "table0", "end"]  # the end waits for the writer thread's table
    assert uploader.end_status == "FINISHED"


def test_a_resumed_process_numbers_after_the_refused_writes_of_the_earlier_one(tmp_path: Path) -> None:
    first = Uploader(tmp_path, RECORD, Tracker(refuse={"a", "b", "c"}).perform)
    for name in "abc":
        first.submit("metrics", name=name, step=0)
    first.close(timeout=10)
    assert sorted(p.name for p in (tmp_path / FAILED).iterdir()) == ["00000001.json", "00000002.json", "00000003.json"]
    second = Uploader(tmp_path, RECORD, Tracker(refuse={"d"}).perform)
    second.submit("metrics", name="d", step=0)
    second.close(timeout=10)
    kept = {p.name: json.loads(p.read_text())["name"] for p in (tmp_path / FAILED).iterdir()}
    assert kept == {"00000001.json": "a", "00000002.json": "b", "00000003.json": "c", "00000004.json": "d"}


def test_close_gives_up_in_time_and_the_worker_performs_nothing_more_not_even_the_end(tmp_path: Path) -> None:
    tracker = Tracker()
    tracker.down.set()
    uploader = Uploader(tmp_path, RECORD, tracker.perform)
    uploader.submit("metrics", name="metrics0", step=0)
    started = time.monotonic()
    left = uploader.close("FINISHED", timeout=1)
    assert time.monotonic() - started < 2
    assert [op.kind for op in left] == ["metrics", "end"]
    tracker.down.clear()  # the server is back, but the run's process has given up: the files carry on
    time.sleep(1.5)
    assert tracker.done == []
    assert sorted(p.name for p in (tmp_path / PENDING).iterdir()) == ["00000001.json", "00000002.json"]
    assert _uploader_threads(tmp_path) == []


def test_a_stuck_writer_thread_holds_close_to_its_bound_and_the_run_ends_failed(tmp_path: Path) -> None:
    tracker = Tracker()
    uploader = Uploader(tmp_path, RECORD, tracker.perform)
    release = threading.Event()
    uploader.submit_after(lambda: release.wait(30) and {"name": "table0"}, "artifact", "t/epoch_0000.parquet")
    started = time.monotonic()
    left = uploader.close("FINISHED", timeout=1)
    assert time.monotonic() - started < 2.5
    assert uploader.unwritten == ["t/epoch_0000.parquet: not written within the wait (ACTION_SCORES_UPLOAD_WAIT)"]
    assert uploader.end_status == "FAILED"
    assert [(op.kind, op.payload) for op in left] == [("end", {"status": "FAILED"})]  # no time left: on disk
    assert tracker.done == []
    release.set()


def test_a_table_the_writer_cannot_make_is_raised_at_the_next_hand_over_and_ends_the_run_failed(
        tmp_path: Path) -> None:
    tracker = Tracker()
    uploader = Uploader(tmp_path, RECORD, tracker.perform)

    def disk_full() -> dict[str, str]:
        raise OSError(28, "No space left on device")

    uploader.submit_after(disk_full, "artifact", "t/epoch_0003.parquet")
    assert uploader.wait_for_writes(time.monotonic() + 10)
    with pytest.raises(ActionScoresError, match=r"^could not write t/epoch_0003.parquet: OSError: \[Errno 28\] No "
                                                r"space left on device; the run will end FAILED"):
        uploader.submit_after(lambda: {"name": "table4"}, "artifact", "t/epoch_0004.parquet")
    uploader.submit_after(lambda: {"name": "table4"}, "artifact", "t/epoch_0004.parquet")  # raised once
    uploader.close("FINISHED", timeout=10)
    assert tracker.done == ["table4", "end"]
    assert uploader.end_status == "FAILED"


def test_the_writer_queue_is_bounded_and_its_waits_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTION_SCORES_WRITE_QUEUE", "2")
    monkeypatch.setenv("ACTION_SCORES_UPLOAD_WAIT", "1")
    uploader = Uploader(tmp_path, RECORD, Tracker().perform)
    release = threading.Event()
    uploader.submit_after(lambda: release.wait(30) and {"name": "table0"}, "artifact", "t/0")
    assert uploader.wait_for_writes(time.monotonic() + 0.3) is False  # the writer is stuck on table0...
    for epoch in (1, 2):  # ...which is no longer queued: two more wait without waiting
        uploader.submit_after(lambda e=epoch: {"name": f"table{e}"}, "artifact", f"t/{epoch}")
    assert uploader.table_waits == 0
    started = time.monotonic()
    with pytest.raises(ActionScoresError, match=r"^2 table\(s\) of .* still wait for the writer thread after 1 s"):
        uploader.submit_after(lambda: {"name": "table3"}, "artifact", "t/3")
    assert 0.9 < time.monotonic() - started < 2
    assert uploader.table_waits == 1
    threading.Timer(0.3, release.set).start()
    uploader.submit_after(lambda: {"name": "table3"}, "artifact", "t/3")  # waits for room, then goes on
    assert uploader.table_waits == 2
    uploader.close("FINISHED", timeout=10)
    assert uploader.unwritten == []


def test_no_thread_outlives_close(tmp_path: Path) -> None:
    uploader = Uploader(tmp_path, RECORD, Tracker().perform)
    uploader.submit_after(lambda: {"name": "table0"}, "artifact", "t/0")
    assert _uploader_threads(tmp_path) == [f"action-scores-{role}-{tmp_path.name}" for role in ("upload", "write")]
    uploader.close("FINISHED", timeout=10)
    assert _uploader_threads(tmp_path) == []
