"""The job's fetch stage: a run's files arriving, bounded, while the scorer reads the ones before.

Engines never see how a table arrives: `RunFiles.tables` hands them (artifact path, reader) pairs, a
reader being a function that waits for its table and returns what pyarrow reads (a path, or a reader
over bytes fetched into memory).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import cast

import pyarrow as pa
from tqdm.auto import tqdm

from tracking.backends.base import Tracker
from tracking.scoring.tables import Epoch, epoch_name, files_of

DOWNLOAD_THREADS = 8
# Epochs downloaded beyond the one being scored: keeps DOWNLOAD_THREADS busy, bounds the disk. A sharded epoch
# takes one place whatever its number of parts (together they weigh one epoch), so all its parts are fetched
# at once, in parallel, and the scorer never waits for a part the window holds back.
FETCH_AHEAD = 16
FETCH_MEMORY = 512 * 2**20  # bytes of fetched tables held in memory at most (plus those in flight); more go to disk


class Fetched:
    """A table fetched straight into memory, read once: `take` hands its bytes over and forgets them, so the
    list of a split's tables, which the job holds until the split is scored, never holds more than the window
    of tables not yet read."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def take(self) -> bytes:
        data, self._data = self._data, None
        if data is None:
            raise RuntimeError("a fetched table is read once")
        return data


Arrival = Path | Fetched  # a fetched file: on disk, or its bytes in memory
TableReader = Callable[[], Path | pa.NativeFile]  # waits for a table; what pyarrow reads it from


def open_table(arrival: Future[Arrival]) -> Path | pa.NativeFile:
    """What pyarrow reads a fetched table from: its path, or a reader over its bytes in memory; waits for a
    table still being fetched (a fetch error is raised here, in the reader's thread)."""
    found = arrival.result()
    return pa.BufferReader(found.take()) if isinstance(found, Fetched) else Path(found)


class RunFiles:
    """A run's files as the job reads them, each a `Future` of its arrival, fetched in the background.

    Where the run's store is a folder on this machine (`Tracker.local_file`) a file is read in place,
    never copied. Otherwise DOWNLOAD_THREADS threads fetch it: epochs (`stream`: a table, or a sharded epoch's
    parts, fetched in parallel) at most `ahead` (default FETCH_AHEAD) beyond the last one the scorer has read
    (`release` of each of its files), each table straight into memory
    where the tracker can (`Tracker.fetch`: a store served over HTTP; the Future's result is then a `Fetched`)
    and the window's tables in memory stay under FETCH_MEMORY bytes, else downloaded under `dst` and the copy
    deleted once read: memory or disk holds a window of tables, not the run. `keep` files (media), and the
    tables of an engine that needs them all (`bounded=False`: it reads files), are downloaded, and stay until
    the end. The progress bar shows from `show_progress` on.
    Use it as a context manager: leaving cancels what has not started and waits for the rest.
    """

    def __init__(self, tracker: Tracker, dst: Path, ahead: int | None = None, progress: bool = True) -> None:
        self._tracker, self._dst, self._free = tracker, dst, FETCH_AHEAD if ahead is None else ahead
        self._pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="action-scores-fetch")
        self._lock = threading.Lock()
        # epochs beyond the window, in order: (their place's number, their files)
        self._waiting: deque[tuple[int, list[tuple[str, Future[Arrival]]]]] = deque()
        self._places = 0  # places numbered so far
        self._unreleased: dict[int, int] = {}  # a place held in the window -> its files not yet released
        # fetched, not yet released -> (copy on disk, the window's place it holds or None, bytes held in memory)
        self._copies: dict[str, tuple[Path | None, int | None, int]] = {}
        self._in_memory = 0  # bytes of the fetched tables not yet released
        self._progress, self._bar = progress, None  # the bar starts with `show_progress`
        self._total = self._fetched = 0  # files asked for, files here

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for _, group in self._waiting:
                for _, future in group:
                    future.cancel()
            self._waiting.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._bar is not None:
            self._bar.close()

    def show_progress(self) -> None:
        """Start the progress bar, from what is already here: the job shows it once it holds the run, so a
        job refused the run (another job holds it, no permission to write) ends with its error alone."""
        with self._lock:
            if self._bar is None:
                self._bar = tqdm(total=self._total, initial=self._fetched, desc="fetch", unit="file",
                                 disable=not self._progress)

    def _count(self, asked: int = 0, here: int = 0) -> None:
        """Files asked for and arrived, on the bar once it is shown (under the lock)."""
        self._total, self._fetched = self._total + asked, self._fetched + here
        if self._bar is not None:
            self._bar.total = self._total
            if here:
                self._bar.update(here)
            else:
                self._bar.refresh()

    def stream(self, epochs: Sequence[Epoch], bounded: bool = True) -> list[Future[Arrival] | list[Future[Arrival]]]:
        """Futures of the tables of `epochs` (a path, or a sharded epoch's parts: a list of futures), fetched in
        order, each copy dropped on `release`. `bounded`: within the window, into memory where the tracker can
        (for a streaming engine), else all at once, as files (an engine that needs every file)."""
        return self._submit(epochs, "window" if bounded else "all")

    def tables(self, epochs: Sequence[Epoch], bounded: bool = True
               ) -> list[tuple[str, TableReader | list[tuple[str, TableReader]]]]:
        """What an engine scores (`tracking.scoring.engines.Tables`): (artifact path, reader) of each epoch of
        `stream`, in order; a sharded epoch's is (its folder, [(part path, reader), ...])."""
        found = []
        for epoch, arrival in zip(epochs, self.stream(epochs, bounded)):
            if isinstance(epoch, list):
                found.append((epoch_name(epoch), [(part, partial(open_table, future))
                                                  for part, future in zip(epoch, cast(list, arrival))]))
            else:
                found.append((epoch, partial(open_table, arrival)))
        return found

    def keep(self, path: str) -> Future[Path]:
        """A file needed until the job ends (a split's media), downloaded now, outside the window."""
        return cast("Future[Path]", self._submit([path], "keep")[0])

    def release(self, path: str) -> None:
        """The scorer has read `path`: delete its copy, and fetch the next table if it held a place."""
        with self._lock:
            local, place, size = self._copies.pop(path, (None, None, 0))
            self._in_memory -= size
            if local is not None:
                local.unlink(missing_ok=True)
            if place is not None:
                self._unreleased[place] -= 1
                if not self._unreleased[place]:  # the epoch's last file: its place is free
                    del self._unreleased[place]
                    self._free += 1
                    self._pump()

    def _submit(self, epochs: Sequence[Epoch], mode: str) -> list[Future[Arrival] | list[Future[Arrival]]]:
        found: list[Future[Arrival] | list[Future[Arrival]]] = []
        with self._lock:
            for epoch in epochs:
                futures: list[tuple[str, Future[Arrival]]] = [(path, Future()) for path in files_of(epoch)]
                self._count(asked=len(futures))
                waiting = []
                for path, future in futures:
                    if (local := self._tracker.local_file(path)) is not None:
                        future.set_result(local)  # read in place: never copied, never deleted, no place taken
                        self._count(here=1)
                    elif mode == "window":
                        waiting.append((path, future))
                    else:
                        self._pool.submit(self._fetch, path, future, mode)
                if waiting:
                    self._waiting.append((self._places, waiting))
                    self._places += 1
                found.append([future for _, future in futures] if isinstance(epoch, list) else futures[0][1])
            self._pump()
        return found

    def _pump(self) -> None:
        """Start the waiting epochs the window has room for, all the files of each (under the lock)."""
        while self._waiting and self._free > 0:
            place, files = self._waiting.popleft()
            self._free -= 1
            self._unreleased[place] = len(files)
            for path, future in files:
                self._pool.submit(self._fetch, path, future, "window", place)

    def _fetch(self, path: str, future: Future[Arrival], mode: str, place: int | None = None) -> None:
        if not future.set_running_or_notify_cancel():
            return
        with self._lock:
            to_memory = mode == "window" and self._in_memory < FETCH_MEMORY
        try:
            data = self._tracker.fetch(path) if to_memory else None
            local: Arrival = Fetched(data) if data is not None else self._tracker.download(path, self._dst)
        except Exception as error:  # handed to the reader, which raises it in the job's thread
            future.set_exception(error)
            return
        with self._lock:
            if mode != "keep":
                size = len(data) if data is not None else 0
                self._in_memory += size
                self._copies[path] = (local if isinstance(local, Path) else None, place, size)
            self._count(here=1)
        future.set_result(local)
