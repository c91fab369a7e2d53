"""The post-hoc job: pull a run's per-epoch tables, score them, log scores and panels back.

Everything is read, checked and computed before anything is written, so a bad table
leaves the run exactly as it was; the `action_scores.status` tag is set last.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pandas as pd
from tqdm.auto import tqdm

from tracking import contract
from tracking.backends.base import Tracker
from tracking.errors import ActionScoresError
from tracking.report.browse import BROWSE_FILE, write_browse_page
from tracking.report.plots import class_distribution, data_map
from tracking.report.views import VIEWS, SplitView, choose_view, load_picture_function
from tracking.scoring.engines import ENGINES, Fetched, LocalFile
from tracking.scoring.regions import REGION
from tracking.scoring.tables import epoch_files

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8
DEFAULT_WORKERS = 4  # runs analysed at once by `analyze_experiment`
FETCH_AHEAD = 16  # epoch tables downloaded beyond the one being scored: keeps DOWNLOAD_THREADS busy, bounds the disk
FETCH_MEMORY = 512 * 2**20  # bytes of fetched tables held in memory at most (plus those in flight); more go to disk
CLASS_DISTRIBUTION = "by_class_distribution.png"  # box plot of action per class, classification splits


@dataclass
class AnalysisResult:
    """What the job did to one run."""

    run_id: str
    status: str  # "done", "skipped" (already analysed) or "failed"
    samples: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    epochs: dict[str, int] = field(default_factory=dict)  # split -> epochs summed
    panels: list[str] = field(default_factory=list)  # artifact paths of the PNGs
    views: dict[str, str] = field(default_factory=dict)  # split -> where its panels' pictures came from
    message: str = ""


class RunFiles:
    """A run's files as the job reads them, each a `Future` of its local path, fetched in the background.

    Where the run's store is a folder on this machine (`Tracker.local_file`) a file is read in place,
    never copied. Otherwise DOWNLOAD_THREADS threads fetch it: epoch tables (`stream`) at most `ahead`
    (default FETCH_AHEAD) beyond the last one the scorer has read (`release`), each straight into memory
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
        self._waiting: deque[tuple[str, Future[LocalFile]]] = deque()  # tables beyond the window, in order
        # fetched, not yet released -> (copy on disk, holds a place, bytes held in memory)
        self._copies: dict[str, tuple[Path | None, bool, int]] = {}
        self._in_memory = 0  # bytes of the fetched tables not yet released
        self._progress, self._bar = progress, None  # the bar starts with `show_progress`
        self._total = self._fetched = 0  # files asked for, files here

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            for _, future in self._waiting:
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

    def stream(self, paths: list[str], bounded: bool = True) -> list[Future[LocalFile]]:
        """Futures of the tables at `paths`, fetched in order, each copy dropped on `release`. `bounded`:
        within the window, into memory where the tracker can (for a streaming engine), else all at once, as
        files (an engine that needs every file)."""
        return self._submit(paths, "window" if bounded else "all")

    def keep(self, path: str) -> Future[Path]:
        """A file needed until the job ends (a split's media), downloaded now, outside the window."""
        return cast("Future[Path]", self._submit([path], "keep")[0])

    def release(self, path: str) -> None:
        """The scorer has read `path`: delete its copy, and fetch the next table if it held a place."""
        with self._lock:
            local, counted, size = self._copies.pop(path, (None, False, 0))
            self._in_memory -= size
            if local is not None:
                local.unlink(missing_ok=True)
            if counted:
                self._free += 1
                self._pump()

    def _submit(self, paths: list[str], mode: str) -> list[Future[LocalFile]]:
        futures: list[tuple[str, Future[LocalFile]]] = [(path, Future()) for path in paths]
        with self._lock:
            self._count(asked=len(paths))
            for path, future in futures:
                if (local := self._tracker.local_file(path)) is not None:
                    future.set_result(local)  # read in place: never copied, never deleted, no place taken
                    self._count(here=1)
                elif mode == "window":
                    self._waiting.append((path, future))
                else:
                    self._pool.submit(self._fetch, path, future, mode)
            self._pump()
        return [future for _, future in futures]

    def _pump(self) -> None:
        """Start the waiting tables the window has room for (under the lock)."""
        while self._waiting and self._free > 0:
            path, future = self._waiting.popleft()
            self._free -= 1
            self._pool.submit(self._fetch, path, future, "window")

    def _fetch(self, path: str, future: Future[LocalFile], mode: str) -> None:
        if not future.set_running_or_notify_cancel():
            return
        with self._lock:
            to_memory = mode == "window" and self._in_memory < FETCH_MEMORY
        try:
            data = self._tracker.fetch(path) if to_memory else None
            local: LocalFile = Fetched(data) if data is not None else self._tracker.download(path, self._dst)
        except Exception as error:  # handed to the reader, which raises it in the job's thread
            future.set_exception(error)
            return
        with self._lock:
            if mode != "keep":
                size = len(data) if data is not None else 0
                self._in_memory += size
                self._copies[path] = (local if isinstance(local, Path) else None, mode == "window", size)
            self._count(here=1)
        future.set_result(local)


def download_all(tracker: Tracker, paths: list[str], dst: Path) -> dict[str, Path]:
    """Fetch files in parallel threads, with a progress bar; returns artifact path -> local path (the file
    itself where the store is local). For a whole folder at once; the job streams instead (`RunFiles`)."""
    with RunFiles(tracker, dst) as files:
        files.show_progress()
        return {path: Path(future.result()) for path, future in zip(paths, files.stream(paths, bounded=False))}


def objectives(scores: pd.DataFrame) -> dict[str, str]:
    """Panel folder name -> score column, for every registered score in the table that gets panels:
    `loss` -> `action`, part `loc` -> `action_loc`, and each other score under its own name (`aum`)."""
    from tracking.scoring.registry import score_of_column

    found = {}
    for column in scores.columns:
        score = score_of_column(column)
        if score is None or not score.panels:
            continue
        if score.per_loss_part:  # the contract's folders: action -> loss, action_loc -> loc
            found[contract.LOSS if column == score.name else column[len(score.name) + 1:]] = column
        else:
            found[column] = column
    return found


def render_split(scores: pd.DataFrame, view: SplitView, top_k: int, out_dir: Path
                 ) -> tuple[list[Path], dict[str, list[dict]]]:
    """Panels for every objective, each ranked once in its score's direction, and the same hardest and
    easiest samples as rows for `Tracker.log_samples`. Per-class panels for the loss objectives."""
    from tracking.report.panels import ranked_panels
    from tracking.scoring.rank import pick
    from tracking.scoring.registry import score_of_column

    written: list[Path] = []
    samples: dict[str, list[dict]] = {}
    for objective, column in objectives(scores).items():
        groups = view.groups if score_of_column(column).per_loss_part else None
        picked = pick(scores, column, top_k, groups)
        pngs, items = ranked_panels(picked, out_dir / objective, view.picture, view.label, split_size=view.size)
        written += pngs
        for which, rows in (("hardest", picked.hardest), ("easiest", picked.easiest)):
            samples[f"{objective}/{which}"] = [
                {"image": item.image, "caption": item.caption, "sample_id": item.sample_id,
                 "rank": int(row["rank"]), column: float(row[column]), "label": view.label(row)}
                for item, (_, row) in zip(items[which], rows.iterrows())
            ]
    return written, samples


def analyze_run(
    tracker: Tracker,
    run_id: str,
    *,
    top_k: int = 10,
    force: bool = False,
    data_root: str | None = None,
    panels: bool = True,
    engine: str = "arrow",
    el2n_epoch: int | None = None,
    pictures: str | Callable[[int], object] | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Score every tracked split of one run and log scores, panels, metrics and the status tag.

    A run already tagged done is skipped unless `force`. `data_root` overrides the data
    folder the run recorded, for data that has moved. `engine`: a name in `ENGINES`;
    `el2n_epoch`: see `score_split`. `pictures`: a function of a sample id that returns a
    uint8 image, or its `module:function` name, for runs with neither media nor a built-in
    dataset (`tracking.report.views.choose_view`). The run is held with `Tracker.job_lock`
    while the job computes and writes (its tables start downloading before: reading needs no
    lock): a second job on it fails, naming the first.
    """
    if top_k <= 0:
        raise ActionScoresError(f"top_k must be positive, got {top_k}")
    if engine not in ENGINES:
        raise ActionScoresError(f"unknown scoring engine {engine!r}; choose one of {sorted(ENGINES)}")
    named = None
    if pictures is not None:  # a bad name fails before the run is touched
        named = ((pictures, load_picture_function(pictures)) if isinstance(pictures, str)
                 else (getattr(pictures, "__qualname__", repr(pictures)), pictures))
    tracker.attach(run_id)

    def skipped() -> AnalysisResult | None:
        if tracker.tags().get(contract.STATUS_TAG) == contract.STATUS_DONE and not force:
            return AnalysisResult(run_id, "skipped", message="already analysed (use force to redo)")
        return None

    if done := skipped():
        return done
    return _analyze(tracker, run_id, top_k, data_root, panels, engine, el2n_epoch, named, progress, skipped)


def media_files(tracker: Tracker, splits: list[str]) -> dict[str, str]:
    """Split -> artifact path of its recorded media table, for the splits that have one."""
    wanted = {f"{contract.media_dir(split)}/{contract.MEDIA_FILE}": split for split in splits}
    return {wanted[path]: path for path in tracker.list_files(contract.MEDIA_DIR) if path in wanted}


def write_text_tables(samples: dict[str, list[dict]], view: SplitView, out_dir: Path) -> list[Path]:
    """Beside each text panel (`<objective>/hardest.png`), its ranked rows with their full text as
    `hardest.csv`; adds `text` to the rows logged with `Tracker.log_samples` too."""
    if view.text is None:
        return []
    written = []
    for key, rows in samples.items():
        for row in rows:
            row["text"] = view.text(row["sample_id"])
        path = out_dir / f"{key}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{name: value for name, value in row.items() if name not in ("image", "caption")}
                      for row in rows]).to_csv(path, index=False)
        written.append(path)
    return written


def _analyze(tracker: Tracker, run_id: str, top_k: int, data_root: str | None, panels: bool,
             engine: str, el2n_epoch: int | None, pictures: tuple[str, Callable[[int], object]] | None,
             progress: bool, skipped: Callable[[], AnalysisResult | None]) -> AnalysisResult:
    """The job's work on a run: read and check everything, compute, then write, status last. The tables start
    downloading first, then the job takes the run (`Tracker.job_lock`, whose settle wait they overlap), and
    `skipped` asks again whether a job has just finished it. Each epoch table is scored as soon as it is here
    (`RunFiles`), while the next ones download."""
    files = tracker.list_files(contract.LOSSES_DIR)
    by_split = epoch_files(files)
    if not by_split:
        raise ActionScoresError(
            f"run {run_id} has no per-sample tables under {contract.LOSSES_DIR}/<split>/epoch_EEEE.parquet; "
            "record them during training with tracking.LossRecorder"
        )
    params = tracker.params()
    dataset = params.get(contract.DATASET_PARAM)
    task = params.get(contract.TASK_PARAM, "classification")
    if task not in VIEWS:
        raise ActionScoresError(f"run {run_id}: unknown {contract.TASK_PARAM} {task!r}; known: {sorted(VIEWS)}")
    data_root = data_root or params.get(contract.DATA_ROOT_PARAM) or None
    result = AnalysisResult(run_id, "done")
    media = media_files(tracker, list(by_split)) if panels else {}
    scorer = ENGINES[engine]
    with ExitStack() as held:  # left in reverse: the lock first, then the downloads, then the folder
        work = held.enter_context(tempfile.TemporaryDirectory(prefix="action-scores-job-"))
        files = held.enter_context(RunFiles(tracker, Path(work) / "in", progress=progress))
        # Every split's tables are queued at once, so the next split's first ones arrive while one is scored.
        tables = {split: list(zip(paths, files.stream(paths, bounded=scorer.streams)))
                  for split, paths in by_split.items()}
        pictures_of = {split: files.keep(path) for split, path in media.items()}
        held.enter_context(tracker.job_lock())  # reading needs no lock: the tables download while it settles
        if done := skipped():  # a job may just have finished
            return done
        files.show_progress()
        out = Path(work) / "out"
        metrics: dict[str, float] = {}
        samples: dict[str, list[dict]] = {}
        for split, pairs in tables.items():
            read = by_split[split]
            scores = scorer.score(split, pairs, el2n_epoch, lambda epoch, read=read: files.release(read[epoch]), progress)
            if scores.attrs.get("missing"):
                result.message = "; ".join(filter(None, [result.message, f"split {split}: {scores.attrs['missing']}"]))
            split_out = out / split
            split_out.mkdir(parents=True)
            view, why = (choose_view(scores, split, media=pictures_of[split].result() if split in media else None,
                                     task=task, dataset=dataset, data_root=data_root, pictures=pictures)
                         if panels else (None, ""))
            if view is not None:
                written, split_samples = render_split(scores, view, top_k, split_out)
                written += write_text_tables(split_samples, view, split_out)
                written.append(write_browse_page(scores, view, split_out / BROWSE_FILE, f"{split}: browse the samples"))
                if view.groups:
                    written.append(class_distribution(
                        scores, "action", view.groups, split_out / contract.LOSS / CLASS_DISTRIBUTION,
                        f"{split}: action per class ({len(scores)} samples, {scores['epochs'].iloc[0]} epochs)"))
                result.panels += [f"{contract.scores_dir(split)}/{p.relative_to(split_out).as_posix()}" for p in written
                                  if p.suffix == ".png"]
                result.views[split] = view.source
                samples |= {f"{contract.scores_dir(split)}/{key}": rows for key, rows in split_samples.items()}
            elif why:
                result.message = "; ".join(filter(None, [result.message, why]))
                log.warning(why)
            if panels and REGION in scores:  # Cartography's map: a plot of scores, it needs no pictures
                how = {"train": " of the training pass", "eval": " of an evaluation pass"}.get(
                    params.get(contract.SCORED_BY_PREFIX + split, ""), "")
                data_map(scores, split_out / contract.DATA_MAP_FILE,
                         f"{split}: data map, {scores['epochs'].iloc[0]} epochs{how}")
                result.panels.append(f"{contract.scores_dir(split)}/{contract.DATA_MAP_FILE}")
            scores.to_parquet(split_out / contract.SCORES_FILE, index=False)
            result.samples[split] = len(scores)
            result.epochs[split] = int(scores["epochs"].iloc[0])
            metrics |= {
                f"action_scores.{split}.samples": len(scores),
                f"action_scores.{split}.epochs": result.epochs[split],
                f"action_scores.{split}.action_mean": float(scores["action"].mean()),
                f"action_scores.{split}.action_max": float(scores["action"].max()),
                f"action_scores.{split}.action_min": float(scores["action"].min()),
            }
        tracker.log_artifacts(out, contract.SCORES_DIR)
        for key, rows in samples.items():
            tracker.log_samples(key, rows)
        tracker.log_metrics(metrics)
        tracker.set_tags({contract.STATUS_TAG: contract.STATUS_DONE})
        tracker.finish()  # flushes a resumed W&B run; a no-op for an attached MLflow run
    return result


def describe(result: AnalysisResult, tracker: Tracker) -> str:
    """What a user reads after a job: the run's status and splits, and where its hardest and easiest panels are
    (with a link into the tracker's UI where it has one)."""
    splits = ", ".join(f"{s}: {n} samples x {result.epochs[s]} epochs" for s, n in result.samples.items())
    lines = [f"run {result.run_id}: {result.status}" + (f" ({splits})" if splits else "")
             + (f" - {result.message}" if result.message else "")]
    overview = [p for p in result.panels if p.endswith(("/hardest.png", "/easiest.png", f"/{contract.DATA_MAP_FILE}"))]
    if overview:
        tracker.attach(result.run_id)
        lines += ["  panels:", *(f"    {tracker.artifact_uri(p)}" for p in overview)]
        if link := tracker.ui_url(overview[0]):
            lines.append(f"  open in the MLflow UI: {link}")
    return "\n".join(lines)


def analyze_experiment(tracker: Tracker, experiment: str, workers: int = DEFAULT_WORKERS,
                       **options: object) -> list[AnalysisResult]:
    """Analyse every finished run of `experiment` that has per-sample tables and needs it, newest first.

    `workers` runs at once, each on its own copy of `tracker` (for a tracker with `concurrent_jobs`; one
    at a time otherwise): a job spends most of its time waiting on the server (requests, the lock's settle
    time), so threads overlap well even on few cores. Runs without tables are left out; a run that fails,
    for whatever reason, is reported as failed with the reason and the others go on.
    """
    if workers < 1:
        raise ActionScoresError(f"workers must be at least 1, got {workers}")
    run_ids = tracker.find_runs(experiment)
    workers = min(workers, max(len(run_ids), 1)) if tracker.concurrent_jobs else 1
    if workers == 1:
        return [r for r in (_analyze_one(tracker, run_id, options) for run_id in run_ids) if r is not None]
    quiet = dict(options, progress=False)  # one bar for the runs, not interleaved bars of each
    with ThreadPoolExecutor(workers, thread_name_prefix="action-scores-run") as pool, \
            tqdm(total=len(run_ids), desc=f"runs of {experiment}", unit="run") as bar:
        futures = [pool.submit(_analyze_one, copy.copy(tracker), run_id, quiet) for run_id in run_ids]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        results = [future.result() for future in futures]
    return [result for result in results if result is not None]


def _analyze_one(tracker: Tracker, run_id: str, options: dict[str, object]) -> AnalysisResult | None:
    """One run of an experiment: None when it has no tables; a failure becomes a failed result naming why."""
    try:
        tracker.attach(run_id)
        if not tracker.list_files(contract.LOSSES_DIR):
            return None
        return analyze_run(tracker, run_id, **options)  # type: ignore[arg-type]
    except ActionScoresError as error:
        return AnalysisResult(run_id, "failed", message=str(error))
    except Exception as error:  # a server error, a bug: this run fails, the others go on
        log.debug("run %s failed", run_id, exc_info=True)
        return AnalysisResult(run_id, "failed", message=f"{type(error).__name__}: {error}")


def summarize(results: list[AnalysisResult], experiment: str) -> str:
    """One line over an experiment's runs: how many were done, skipped and failed, each failed run with why."""
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    line = f"experiment {experiment!r}: " + ", ".join(f"{n} {status}" for status, n in counts.items())
    failed = [f"  run {r.run_id}: {r.message}" for r in results if r.status == "failed"]
    return "\n".join([line + (":" if failed else ""), *failed])
