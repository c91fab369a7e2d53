"""The post-hoc job: pull a run's per-epoch tables, score them, log scores and panels back.

Everything is read, checked and computed before anything is written, so a bad table
leaves the run exactly as it was; the `action_scores.status` tag is set last.
"""

from __future__ import annotations

import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from tracking import contract
from tracking.backends.base import Tracker
from tracking.errors import ActionScoresError
from tracking.report.plots import class_distribution
from tracking.report.views import VIEWS, SplitView, choose_view, load_picture_function
from tracking.scoring.engines import ENGINES
from tracking.scoring.tables import epoch_files

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8
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


def download_all(tracker: Tracker, paths: list[str], dst: Path) -> dict[str, Path]:
    """Fetch files in parallel threads, with a progress bar; returns artifact path -> local path."""
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool, tqdm(total=len(paths), desc="download", unit="file") as bar:
        futures = {path: pool.submit(tracker.download, path, dst) for path in paths}
        local = {}
        for path, future in futures.items():
            local[path] = future.result()
            bar.update()
    return local


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
) -> AnalysisResult:
    """Score every tracked split of one run and log scores, panels, metrics and the status tag.

    A run already tagged done is skipped unless `force`. `data_root` overrides the data
    folder the run recorded, for data that has moved. `engine`: a name in `ENGINES`;
    `el2n_epoch`: see `score_split`. `pictures`: a function of a sample id that returns a
    uint8 image, or its `module:function` name, for runs with neither media nor a built-in
    dataset (`tracking.report.views.choose_view`). The run is held with `Tracker.job_lock`
    meanwhile: a second job on it fails, naming the first.
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
    with tracker.job_lock():
        return skipped() or _analyze_locked(tracker, run_id, top_k, data_root, panels, engine,  # a job may just have finished
                                          el2n_epoch, named)


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


def _analyze_locked(tracker: Tracker, run_id: str, top_k: int, data_root: str | None, panels: bool,
                    engine: str, el2n_epoch: int | None,
                    pictures: tuple[str, Callable[[int], object]] | None) -> AnalysisResult:
    """The job's work on a run it holds: read and check everything, compute, then write, status last."""
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
    with tempfile.TemporaryDirectory(prefix="action-scores-job-") as work:
        local = download_all(tracker, [p for paths in by_split.values() for p in paths] + list(media.values()),
                             Path(work) / "in")
        out = Path(work) / "out"
        metrics: dict[str, float] = {}
        samples: dict[str, list[dict]] = {}
        for split, paths in by_split.items():
            scores = ENGINES[engine](split, [(p, local[p]) for p in paths], el2n_epoch)
            if scores.attrs.get("missing"):
                result.message = "; ".join(filter(None, [result.message, f"split {split}: {scores.attrs['missing']}"]))
            split_out = out / split
            split_out.mkdir(parents=True)
            view, why = (choose_view(scores, split, media=local[media[split]] if split in media else None, task=task,
                                     dataset=dataset, data_root=data_root, pictures=pictures)
                         if panels else (None, ""))
            if view is not None:
                written, split_samples = render_split(scores, view, top_k, split_out)
                written += write_text_tables(split_samples, view, split_out)
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
    overview = [p for p in result.panels if p.endswith(("/hardest.png", "/easiest.png"))]
    if overview:
        tracker.attach(result.run_id)
        lines += ["  panels:", *(f"    {tracker.artifact_uri(p)}" for p in overview)]
        if link := tracker.ui_url(overview[0]):
            lines.append(f"  open in the MLflow UI: {link}")
    return "\n".join(lines)


def analyze_experiment(tracker: Tracker, experiment: str, **options: object) -> list[AnalysisResult]:
    """Analyse every finished run of `experiment` that has per-sample tables and needs it.

    Runs without tables are left out; a run that fails is reported and the others go on.
    """
    results = []
    for run_id in tracker.find_runs(experiment):
        tracker.attach(run_id)
        if not tracker.list_files(contract.LOSSES_DIR):
            continue
        try:
            results.append(analyze_run(tracker, run_id, **options))  # type: ignore[arg-type]
        except ActionScoresError as error:
            results.append(AnalysisResult(run_id, "failed", message=str(error)))
    return results
