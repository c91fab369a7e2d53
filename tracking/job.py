"""One run's post-hoc job, stage by stage: fetch its tables, then per split score, write the scores, report.

Everything is read, checked and computed before anything is logged, so a bad table leaves the run exactly
as it was; the `action_scores.status` tag is set last. Each split's `scores.parquet` is written before its
report stage runs, and the report gets a copy of the frame: what is saved never depends on the panels.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from tracking import contract
from tracking.backends.base import Tracker
from tracking.errors import ActionScoresError
from tracking.fetch import RunFiles
from tracking.report.plots import class_distribution, data_map, data_map_points
from tracking.report.browse import BROWSE_FILE, write_browse_page
from tracking.report.views import TASKS, SplitView, choose_view, load_picture_function
from tracking.scoring.engines import ENGINES
from tracking.scoring.regions import REGION
from tracking.scoring.tables import Epoch, epoch_files, files_of

log = logging.getLogger(__name__)

CLASS_DISTRIBUTION = "by_class_distribution.png"  # box plot of action per class, classification splits
PictureFunction = Callable[[int], object]  # a sample id -> a uint8 image


@dataclass(frozen=True)
class JobOptions:
    """How the job treats a run, checked once when made (a bad option fails before any run is touched).

    `top_k`: samples per panel. `force`: redo a run already tagged done. `data_root`: overrides the data
    folder the run recorded. `panels`: draw the report (the scores are the same without). `engine`: a name
    in `ENGINES`. `el2n_epoch`: see `score_split`. `pictures`: a function of a sample id that returns a uint8
    image, or its `module:function` name, for runs with neither media nor a built-in dataset.
    """

    top_k: int = 10
    force: bool = False
    data_root: str | None = None
    panels: bool = True
    engine: str = "arrow"
    el2n_epoch: int | None = None
    pictures: str | PictureFunction | None = None
    progress: bool = True
    picture_function: tuple[str, PictureFunction] | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if self.top_k <= 0:
            raise ActionScoresError(f"top_k must be positive, got {self.top_k}")
        if self.engine not in ENGINES:
            raise ActionScoresError(f"unknown scoring engine {self.engine!r}; choose one of {sorted(ENGINES)}")
        if self.pictures is not None:  # a bad name fails here
            named = ((self.pictures, load_picture_function(self.pictures)) if isinstance(self.pictures, str)
                     else (getattr(self.pictures, "__qualname__", repr(self.pictures)), self.pictures))
            object.__setattr__(self, "picture_function", named)


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

    def note(self, text: str) -> None:
        """Add a line to the message the user reads."""
        self.message = "; ".join(filter(None, [self.message, text]))


@dataclass(frozen=True)
class RunPlan:
    """What the job reads of a run before it holds it: its tables by split and the params its stages need."""

    run_id: str
    tables: dict[str, list[Epoch]]  # split -> its epochs (a table's artifact path, or a sharded epoch's parts)
    media: dict[str, str]  # split -> artifact path of its media table (with panels only)
    params: dict[str, str]

    @property
    def task(self) -> str:
        return self.params.get(contract.TASK_PARAM, "classification")


@dataclass
class SplitReport:
    """What a split's report stage made: files under its folder, rows for `Tracker.write_samples`, its view."""

    written: list[Path] = field(default_factory=list)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # "<objective>/<hardest|easiest>" -> rows
    source: str = ""  # where the pictures came from; empty without a view
    why_not: str = ""  # why there are no panels, where there are none
    data_map: pd.DataFrame | None = None  # the points of the data map, for `Tracker.write_scatter`; None without one


def run_job(tracker: Tracker, run_id: str, options: JobOptions) -> AnalysisResult:
    """Score every tracked split of one run and log scores, panels, metrics and the status tag.

    A run already tagged done is skipped unless `options.force`. The tables start downloading first, then
    the job takes the run (`Tracker.job_lock`, whose settle wait they overlap) and asks again whether a job
    has just finished it. A resumed W&B run is finished whatever happens.
    """
    tracker.attach(run_id)
    if done := _skipped(tracker, run_id, options):
        return done
    return _analyze(tracker, plan(tracker, run_id, options), options)


class NoTables(ActionScoresError):
    """A run without per-sample tables: `analyze_experiment` leaves it out, `analyze_run` fails with this."""


def _skipped(tracker: Tracker, run_id: str, options: JobOptions) -> AnalysisResult | None:
    """A skipped result for a run already done, unless `options.force` (which needs no request to the tracker)."""
    if not options.force and tracker.tags().get(contract.STATUS_TAG) == contract.STATUS_DONE:
        return AnalysisResult(run_id, "skipped", message="already analysed (use force to redo)")
    return None


def plan(tracker: Tracker, run_id: str, options: JobOptions) -> RunPlan:
    """The run's tables, media and params, checked: a run without tables or of an unknown task is refused."""
    by_split = epoch_files(tracker.list_files(contract.LOSSES_DIR))
    if not by_split:
        raise NoTables(
            f"run {run_id} has no per-sample tables under {contract.LOSSES_DIR}/<split>/epoch_EEEE.parquet (or "
            "epoch_EEEE/part-RRRRR.parquet); "
            "record them during training with tracking.LossRecorder"
        )
    found = RunPlan(run_id, by_split, media_files(tracker, list(by_split)) if options.panels else {}, tracker.params())
    if found.task not in TASKS:
        raise ActionScoresError(f"run {run_id}: unknown {contract.TASK_PARAM} {found.task!r}; known: {sorted(TASKS)}")
    return found


def media_files(tracker: Tracker, splits: list[str]) -> dict[str, str]:
    """Split -> artifact path of its recorded media table, for the splits that have one."""
    wanted = {f"{contract.media_dir(split)}/{contract.MEDIA_FILE}": split for split in splits}
    return {wanted[path]: path for path in tracker.list_files(contract.MEDIA_DIR) if path in wanted}


def _analyze(tracker: Tracker, run: RunPlan, options: JobOptions) -> AnalysisResult:
    """Fetch, then per split score, write, report; then log it all, status last."""
    scorer = ENGINES[options.engine]
    with ExitStack() as held:  # left in reverse: the lock first, then the downloads, then the folder
        work = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="action-scores-job-")))
        files = held.enter_context(RunFiles(tracker, work / "in", progress=options.progress))
        # Every split's tables are queued at once, so the next split's first ones arrive while one is scored.
        tables = {split: files.tables(paths, bounded=scorer.streams) for split, paths in run.tables.items()}
        media = {split: files.keep(path) for split, path in run.media.items()}
        held.enter_context(tracker.job_lock())  # reading needs no lock: the tables download while it settles
        # Whatever happens, before the lock goes: waits for the writes, and closes a W&B run the job resumed
        # (a no-op for an attached MLflow run without writes).
        held.callback(tracker.finish)
        if done := _skipped(tracker, run.run_id, options):  # a job may just have finished
            return done
        files.show_progress()
        result, metrics, samples, maps = AnalysisResult(run.run_id, "done"), {}, {}, {}
        for split, split_tables in tables.items():
            scores = scorer.score(split, split_tables, options.el2n_epoch,
                                  partial(_release_epoch, files, run.tables[split]), options.progress)
            split_out = work / "out" / split
            write_scores(scores, split_out)
            held_media = media[split].result() if split in media else None
            if not options.panels:
                report = SplitReport()
            elif isinstance(scores, pd.DataFrame):
                report = report_split(scores.copy(), split, run, held_media, options, split_out)
            else:  # --engine spark: the scores stay in Spark, only the panels' rows come back
                report = scores.report(split, run, held_media, options, split_out)
            _record_split(result, split, scores, report, split_out)
            samples |= {f"{contract.scores_dir(split)}/{key}": rows for key, rows in report.samples.items()}
            if report.data_map is not None:
                maps[split] = report.data_map
            metrics |= split_metrics(split, scores)
        tracker.write_artifacts(work / "out", contract.SCORES_DIR)
        for key, rows in samples.items():
            tracker.write_samples(key, rows)
        for split, points in maps.items():
            tracker.write_scatter(f"{contract.scores_dir(split)}/data_map", points, "variability", "confidence",
                                f"{split}: data map (confidence against variability)")
        tracker.write_metrics(metrics)
        tracker.set_tags({contract.STATUS_TAG: contract.STATUS_DONE})
    return result


def _release_epoch(files: RunFiles, epochs: list[Epoch], epoch: int) -> None:
    """An engine has read `epoch`: every file of it (a table, or each part) may go."""
    for path in files_of(epochs[epoch]):
        files.release(path)


def write_scores(scores: pd.DataFrame, split_out: Path) -> Path:
    """The split's `scores.parquet`, written before its report stage runs (by Spark for `SparkScores`)."""
    if not isinstance(scores, pd.DataFrame):
        return scores.write(split_out)
    split_out.mkdir(parents=True)
    path = split_out / contract.SCORES_FILE
    scores.to_parquet(path, index=False)
    return path


def split_metrics(split: str, scores: pd.DataFrame) -> dict[str, float]:
    """The run's summary metrics of one split."""
    if not isinstance(scores, pd.DataFrame):
        return scores.metrics(split)
    return {
        f"action_scores.{split}.samples": len(scores),
        f"action_scores.{split}.epochs": int(scores["epochs"].iloc[0]),
        f"action_scores.{split}.action_mean": float(scores["action"].mean()),
        f"action_scores.{split}.action_max": float(scores["action"].max()),
        f"action_scores.{split}.action_min": float(scores["action"].min()),
    }


def _record_split(result: AnalysisResult, split: str, scores: pd.DataFrame, report: SplitReport,
                  split_out: Path) -> None:
    """What a split adds to the job's result."""
    if scores.attrs.get("missing"):
        result.note(f"split {split}: {scores.attrs['missing']}")
    if report.why_not:
        result.note(report.why_not)
        log.warning(report.why_not)
    if report.source:
        result.views[split] = report.source
    result.panels += [f"{contract.scores_dir(split)}/{p.relative_to(split_out).as_posix()}" for p in report.written
                      if p.suffix == ".png"]
    result.samples[split] = len(scores)
    result.epochs[split] = int(scores["epochs"].iloc[0]) if isinstance(scores, pd.DataFrame) else scores.epochs


def report_split(scores: pd.DataFrame, split: str, run: RunPlan, media: Path | None, options: JobOptions,
                 split_out: Path) -> SplitReport:
    """A split's report: panels from the view its pictures come from, and Cartography's data map (a plot of
    scores, it needs no pictures). `scores` is the report's own copy: nothing here reaches `scores.parquet`."""
    view, why_not = choose_view(scores, split, media=media, task=run.task, dataset=run.params.get(contract.DATASET_PARAM),
                                data_root=options.data_root or run.params.get(contract.DATA_ROOT_PARAM) or None,
                                pictures=options.picture_function)
    report = SplitReport(why_not=why_not)
    if view is not None:
        shown = view.frame(scores)  # the view's columns (label names, object counts) beside the scores, never saved
        report.written, report.samples = render_split(shown, view, options.top_k, split_out)
        report.written += write_text_tables(report.samples, view, split_out)
        report.written.append(write_browse_page(shown, view, split_out / BROWSE_FILE, f"{split}: browse the samples"))
        report.source = view.source
        if view.groups:
            report.written.append(class_distribution(
                shown, "action", view.groups, split_out / contract.LOSS / CLASS_DISTRIBUTION,
                f"{split}: action per class ({len(scores)} samples, {scores['epochs'].iloc[0]} epochs)"))
    if REGION in scores:
        how = {"train": " of the training pass", "eval": " of an evaluation pass"}.get(
            run.params.get(contract.SCORED_BY_PREFIX + split, ""), "")
        report.written.append(data_map(scores, split_out / contract.DATA_MAP_FILE,
                                       f"{split}: data map, {scores['epochs'].iloc[0]} epochs{how}"))
        report.data_map = data_map_points(scores)[[column for column in (
            contract.SAMPLE_ID, "confidence", "variability", "correctness", REGION, "label") if column in scores]]
    return report


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


def render_split(scores: pd.DataFrame, view: SplitView, top_k: int, out_dir: Path, picks: dict | None = None
                 ) -> tuple[list[Path], dict[str, list[dict]]]:
    """Panels for every objective, each ranked once in its score's direction, and the same hardest and
    easiest samples as rows for `Tracker.write_samples`. Per-class panels for the loss objectives. `picks`:
    each column's `Picked`, ranked elsewhere (`SparkScores.report`; `scores` then holds only their rows)."""
    from tracking.report.panels import ranked_panels
    from tracking.scoring.rank import pick
    from tracking.scoring.registry import score_of_column

    written: list[Path] = []
    samples: dict[str, list[dict]] = {}
    for objective, column in objectives(scores).items():
        groups = view.groups if score_of_column(column).per_loss_part else None
        picked = picks[column] if picks is not None else pick(scores, column, top_k, groups)
        pngs, items = ranked_panels(picked, out_dir / objective, view.picture, view.label, split_size=view.size)
        written += pngs
        for which, rows in (("hardest", picked.hardest), ("easiest", picked.easiest)):
            samples[f"{objective}/{which}"] = [
                {"image": item.image, "caption": item.caption, "sample_id": item.sample_id,
                 "rank": int(row["rank"]), column: float(row[column]), "label": view.label(row)}
                for item, (_, row) in zip(items[which], rows.iterrows())
            ]
    return written, samples


def write_text_tables(samples: dict[str, list[dict]], view: SplitView, out_dir: Path) -> list[Path]:
    """Beside each text panel (`<objective>/hardest.png`), its ranked rows with their full text as
    `hardest.csv`; adds `text` to the rows logged with `Tracker.write_samples` too."""
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
