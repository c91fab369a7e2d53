"""`Uploader` on its own, with a plain-Python `perform` (no server): numbering across processes,
ordering, refusals, bounded waits, abandoning, the bounded writer queue and its threads, and the one
writer per spool folder (two writers of one run, in one process or two)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tracking.backends.uploads import (FAILED, PENDING, Operation, SpoolInUse, Uploader, UploadRefused, claim_spool,
                                      replay)
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


class FileTracker(Tracker):
    """A `Tracker` that also notes, for each artifact it takes, its name and the bytes of its file then."""

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        super().__init__(refuse)
        self.seen: list[tuple[str, bytes | None]] = []

    def perform(self, operation: Operation, maybe_done: bool) -> None:
        super().perform(operation, maybe_done)
        if operation.kind == "artifact":
            path = Path(operation.payload["path"])
            self.seen.append((path.name, path.read_bytes() if path.is_file() else None))


def _spooled(spool: Path, name: str, content: bytes = b"table") -> Path:
    path = spool / "per_sample_losses" / "t" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_an_uploaded_table_leaves_the_spool_and_a_file_from_elsewhere_stays(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    tracker = FileTracker()
    uploader = Uploader(spool, RECORD, tracker.perform)
    table, mine = _spooled(spool, "epoch_0000.parquet", b"epoch 0"), tmp_path / "mine.parquet"
    mine.write_bytes(b"the user's")
    for path in (table, mine):
        uploader.submit("artifact", name=path.name, path=str(path), artifact_dir="per_sample_losses/t")
    assert uploader.close("FINISHED", timeout=10) == []
    assert tracker.seen == [("epoch_0000.parquet", b"epoch 0"), ("mine.parquet", b"the user's")]
    assert (table.exists(), mine.read_bytes()) == (False, b"the user's")


def test_a_refused_or_retried_write_keeps_its_file_until_it_is_done(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    tracker = FileTracker(refuse={"refused"})
    tracker.down.set()
    uploader = Uploader(spool, RECORD, tracker.perform)
    refused, retried = _spooled(spool, "epoch_0000.parquet"), _spooled(spool, "epoch_0001.parquet")
    for name, path in (("refused", refused), ("retried", retried)):
        uploader.submit("artifact", name=name, path=str(path), artifact_dir="per_sample_losses/t")
    time.sleep(0.3)  # the first try failed: the server is away
    assert (refused.is_file(), retried.is_file()) == (True, True)
    tracker.down.clear()
    assert uploader.close("FINISHED", timeout=10) == []
    assert [name for name, _ in tracker.seen] == ["epoch_0001.parquet"]
    assert [op.describe for op, _ in uploader.refused] == ["per_sample_losses/t/epoch_0000.parquet"]
    assert (refused.read_bytes(), retried.exists()) == (b"table", False)  # the refused one, for `action-scores upload`
    assert sorted(p.name for p in (spool / FAILED).iterdir()) == ["00000001.json"]


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_keep_local_keeps_the_uploaded_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "environment":
        monkeypatch.setenv("ACTION_SCORES_KEEP_LOCAL", "1")
    spool = tmp_path / "spool"
    uploader = Uploader(spool, RECORD, FileTracker().perform, keep_local=True if how == "argument" else None)
    table = _spooled(spool, "epoch_0000.parquet", b"epoch 0")
    uploader.submit("artifact", name="t", path=str(table), artifact_dir="per_sample_losses/t")
    assert uploader.close("FINISHED", timeout=10) == []
    assert table.read_bytes() == b"epoch 0"


def test_keep_local_that_is_not_a_yes_or_no_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTION_SCORES_KEEP_LOCAL", "sometimes")
    with pytest.raises(ActionScoresError, match=r"^ACTION_SCORES_KEEP_LOCAL must be 1 \(keep uploaded tables in the "
                                                r"spool\) or 0, got 'sometimes'$"):
        Uploader(tmp_path, RECORD, FileTracker().perform)


def test_a_table_a_later_write_names_again_stays_for_it(tmp_path: Path) -> None:
    """A resumed process re-records an epoch whose earlier upload is still queued: the earlier upload leaves the
    file to the later one, whether that one is queued already or still being written by the writer thread."""
    spool = tmp_path / "spool"
    tracker = FileTracker()
    uploader = Uploader(spool, RECORD, tracker.perform)
    queued, remade = _spooled(spool, "epoch_0001.parquet", b"old 1"), _spooled(spool, "epoch_0002.parquet", b"old 2")
    uploader.submit("artifact", name="queued", path=str(queued), artifact_dir="per_sample_losses/t")
    uploader.submit("artifact", name="queued again", path=str(queued), artifact_dir="per_sample_losses/t")

    def make_again() -> dict[str, str]:  # the epoch again, written while its earlier upload is being done
        remade.write_bytes(b"new 2")
        while (spool / PENDING / "00000003.json").exists():  # until the earlier upload is done...
            time.sleep(0.01)
        time.sleep(0.2)  # ...and what follows it (its clean-up) too
        return {"name": "remade", "path": str(remade), "artifact_dir": "per_sample_losses/t"}

    tracker.down.set()  # the earlier upload of epoch 2 waits until its file is made again
    uploader.submit("artifact", name="remade early", path=str(remade), artifact_dir="per_sample_losses/t")
    uploader.submit_after(make_again, "artifact", "per_sample_losses/t/epoch_0002.parquet")
    while remade.read_bytes() != b"new 2":
        time.sleep(0.01)
    tracker.down.clear()
    assert uploader.close("FINISHED", timeout=20) == []
    assert tracker.seen == [("epoch_0001.parquet", b"old 1"), ("epoch_0001.parquet", b"old 1"),
                            ("epoch_0002.parquet", b"new 2"), ("epoch_0002.parquet", b"new 2")]
    assert (queued.exists(), remade.exists()) == (False, False)


# --- one writer per spool folder ---------------------------------------------------------------
def _names(spool: Path) -> dict[str, str]:
    """The pending operations of `spool` by file: their `name`, or their kind."""
    return {p.name: (record := json.loads(p.read_text())).get("name", record["kind"])
            for p in sorted((spool / PENDING).glob("*.json"))}


def test_a_second_uploader_on_a_folder_another_one_holds_is_refused_and_takes_over_once_it_is_closed(
        tmp_path: Path) -> None:
    """Two queues numbering their operations in one folder overwrite each other's files: the second is refused,
    naming the holder. Once the first is closed (given up, the server away), the next one replays its writes."""
    tracker = Tracker()
    tracker.down.set()
    first = Uploader(tmp_path, RECORD, tracker.perform)
    first.submit("metrics", name="a0", step=0)
    with pytest.raises(SpoolInUse, match=rf"^{tmp_path} is held by a writer that is still running "
                                         rf"\({socket.gethostname()}:{os.getpid()}, writer.lock\)"):
        Uploader(tmp_path, RECORD, tracker.perform)
    assert [op.kind for op in first.close(timeout=0.5)] == ["metrics"]
    tracker.down.clear()
    again = Uploader(tmp_path, RECORD, tracker.perform)
    again.submit("metrics", name="a1", step=1)
    assert again.close("FINISHED", timeout=10) == []
    assert tracker.done == ["a0", "a1", "end"]


def test_two_writers_of_one_run_in_one_process_get_folders_of_their_own_and_lose_no_write(tmp_path: Path) -> None:
    """Two callbacks, one per split, on one run: each claims a folder (the second `-writer2`) and numbers its own
    writes there. Left behind by an outage, `replay` of the run's folder performs both, the end of the run last."""
    tracker = Tracker()
    tracker.down.set()
    base = tmp_path / "mlflow-r1"
    first, second = Uploader(claim_spool(base), RECORD, tracker.perform), Uploader(claim_spool(base), RECORD,
                                                                                   tracker.perform)
    assert (first.spool, second.spool) == (base, tmp_path / "mlflow-r1-writer2")
    for epoch in range(2):
        first.submit("metrics", name=f"first{epoch}", step=epoch)
        second.submit("metrics", name=f"second{epoch}", step=epoch)
    first.close("FINISHED", timeout=0.5)
    second.close(timeout=0.5)
    assert _names(base) == {"00000001.json": "first0", "00000002.json": "first1", "00000003.json": "end"}
    assert _names(second.spool) == {"00000001.json": "second0", "00000002.json": "second1"}
    tracker.down.clear()
    assert [op.payload.get("name", op.kind) for op in replay(base, tracker.perform)] == [
        "first0", "first1", "second0", "second1", "end"]
    assert tracker.done == ["first0", "first1", "second0", "second1", "end"]
    assert (_names(base), _names(second.spool)) == ({}, {})


def test_the_runs_own_folder_takes_over_what_a_second_writer_left_unless_that_writer_still_runs(
        tmp_path: Path) -> None:
    """A resumed process with one writer: the leftovers of the earlier process's second writer are performed
    after its own (its end of run dropped); a `-writer<N>` folder that a live writer holds is left to it."""
    tracker, live = Tracker(), Tracker()
    tracker.down.set()
    live.down.set()
    base = tmp_path / "mlflow-r1"
    earlier = [Uploader(claim_spool(base), RECORD, (tracker if number < 2 else live).perform) for number in range(3)]
    for number, uploader in enumerate(earlier):
        uploader.submit("metrics", name=f"writer{number + 1}", step=0)
    earlier[0].close(timeout=0.5)
    earlier[1].close("FINISHED", timeout=0.5)
    tracker.down.clear()
    claim = claim_spool(base)
    resumed = Uploader(claim, RECORD, tracker.perform)  # writer3 still runs: not taken over
    resumed.submit("metrics", name="resumed", step=1)
    assert resumed.close("FINISHED", timeout=10) == []
    assert tracker.done == ["writer1", "writer2", "resumed", "end"]
    assert (_names(base), _names(tmp_path / "mlflow-r1-writer2")) == ({}, {})
    assert _names(tmp_path / "mlflow-r1-writer3") == {"00000001.json": "writer3"}
    live.down.clear()
    assert earlier[2].close(timeout=10) == []  # its own queue performs it once its server is back
    assert live.done == ["writer3"]
    with pytest.raises(ActionScoresError, match=r"claim of its spool folder was released"):
        Uploader(claim, RECORD, tracker.perform)  # a claim serves one uploader: its close lets the next writer in


def test_another_process_holding_the_folder_gets_it_to_itself_until_it_exits(tmp_path: Path) -> None:
    """A second process on the same run never shares the first one's folder; the kernel frees it when the
    holder exits, however it exits (here SIGKILL), so a claim never goes stale."""
    base = tmp_path / "mlflow-r1"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tracking.backends.uploads import "
         "claim_spool; claim = claim_spool(Path(sys.argv[1])); print(claim.path, flush=True); sys.stdin.read()",
         str(base)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == str(base)
        mine = claim_spool(base)
        assert mine.path == tmp_path / "mlflow-r1-writer2"
        with pytest.raises(SpoolInUse, match=rf"\({socket.gethostname()}:{holder.pid}, writer.lock\)"):
            claim_spool(base, exact=True)
        with pytest.raises(SpoolInUse):
            replay(base, Tracker().perform)  # `action-scores upload` leaves a running writer's folder alone
    finally:
        holder.kill()
        holder.wait()
    assert claim_spool(base).path == base
    mine.release()
    assert claim_spool(base, exact=True).path == base  # released (the claim above was collected)
