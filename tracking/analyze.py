"""The post-hoc job's commands: analyse one run (`analyze_run`) or an experiment's runs (`analyze_experiment`),
and what a user reads afterwards (`describe`, `summarize`). The job itself, stage by stage, is `tracking.job`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from tracking import contract
from tracking.backends.base import Tracker
from tracking.errors import ActionScoresError
from tracking.job import AnalysisResult, JobOptions, NoTables, PictureFunction, run_job

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 4  # runs analysed at once by `analyze_experiment`


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
    pictures: str | PictureFunction | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Score every tracked split of one run and log scores, panels, metrics and the status tag.

    The options are `JobOptions`' (checked before the run is touched). The run is held with
    `Tracker.job_lock` while the job computes and writes (its tables start downloading before:
    reading needs no lock): a second job on it fails, naming the first.
    """
    options = JobOptions(top_k=top_k, force=force, data_root=data_root, panels=panels, engine=engine,
                         el2n_epoch=el2n_epoch, pictures=pictures, progress=progress)
    return run_job(tracker, run_id, options)


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
    checked = JobOptions(**options)  # type: ignore[arg-type]  # bad options fail once, before any run
    run_ids = tracker.find_runs(experiment)
    workers = min(workers, max(len(run_ids), 1)) if tracker.concurrent_jobs else 1
    if workers == 1:
        return [r for r in (_analyze_one(tracker, run_id, checked) for run_id in run_ids) if r is not None]
    quiet = dataclasses.replace(checked, progress=False)  # one bar for the runs, not interleaved bars of each
    with ThreadPoolExecutor(workers, thread_name_prefix="action-scores-run") as pool, \
            tqdm(total=len(run_ids), desc=f"runs of {experiment}", unit="run") as bar:
        futures = [pool.submit(_analyze_one, copy.copy(tracker), run_id, quiet) for run_id in run_ids]
        for future in futures:
            future.add_done_callback(lambda _: bar.update())
        results = [future.result() for future in futures]
    return [result for result in results if result is not None]


def _analyze_one(tracker: Tracker, run_id: str, options: JobOptions) -> AnalysisResult | None:
    """One run of an experiment: None when it has no tables; a failure becomes a failed result naming why."""
    try:
        return run_job(tracker, run_id, options)
    except NoTables:
        return None
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
