"""The post-hoc job: pull a run's per-epoch tables, score them, log scores and panels back.

Everything is read, checked and computed before anything is written, so a bad table
leaves the run exactly as it was; the `action_scores.status` tag is set last.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.plots import class_distribution
from tracking.scores import ActionAccumulator, default_el2n_epoch, read_epoch_table
from tracking.trackers import Tracker

if TYPE_CHECKING:
    from tracking.data import SplitData

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8
READ_AHEAD = 2  # epoch tables decoded in parallel while the previous one is summed
CLASS_DISTRIBUTION = "by_class_distribution.png"  # box plot of action per class, classification splits


@dataclass
class AnalysisResult:
    """What the job did to one run."""

    run_id: str
    status: str  # "done", "skipped" (already analysed) or "failed"
    samples: dict[str, int] = field(default_factory=dict)  # split -> number of samples
    epochs: dict[str, int] = field(default_factory=dict)  # split -> epochs summed
    panels: list[str] = field(default_factory=list)  # artifact paths of the PNGs
    message: str = ""


def epoch_files(files: list[str]) -> dict[str, list[str]]:
    """Group `per_sample_losses/<split>/epoch_EEEE.parquet` paths by split, in epoch order.

    Epochs must run 0, 1, ..., N-1 without a gap; files that are not parquet are ignored.
    """
    by_split: dict[str, dict[int, str]] = defaultdict(dict)
    for path in files:
        split, name = contract.split_of_artifact(path)
        epoch = contract.parse_epoch_file_name(name)
        if epoch is None:
            if name.endswith(".parquet"):
                raise ActionScoresError(f"{path}: not named epoch_EEEE.parquet (zero-based epoch, 4 digits)")
            continue
        if epoch in by_split[split]:
            raise ActionScoresError(f"split {split!r}: two tables for epoch {epoch}: {by_split[split][epoch]} and {path}")
        by_split[split][epoch] = path
    grouped = {}
    for split, epochs in sorted(by_split.items()):
        last = max(epochs)
        if len(epochs) != last + 1:
            # Never materialise 0..last: a file named epoch_99999999.parquet must not cost 100M entries.
            first = list(itertools.islice((e for e in range(last + 1) if e not in epochs), 10))
            more = last + 1 - len(epochs) - len(first)
            names = f"[{', '.join(contract.epoch_file_name(e) for e in first)}]" + (f" and {more} more" if more else "")
            raise ActionScoresError(
                f"split {split!r}: epoch tables missing: {names} (found {len(epochs)} of epochs 0..{last})"
            )
        grouped[split] = [epochs[e] for e in sorted(epochs)]
    return grouped


def download_all(tracker: Tracker, paths: list[str], dst: Path) -> dict[str, Path]:
    """Fetch files in parallel threads, with a progress bar; returns artifact path -> local path."""
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool, tqdm(total=len(paths), desc="download", unit="file") as bar:
        futures = {path: pool.submit(tracker.download, path, dst) for path in paths}
        local = {}
        for path, future in futures.items():
            local[path] = future.result()
            bar.update()
    return local


def score_split(split: str, tables: list[tuple[str, Path]], el2n_epoch: int | None = None) -> pd.DataFrame:
    """Scores of one split from its (artifact path, local file) pairs, in epoch order.

    `el2n_epoch` (zero-based) picks the table `el2n` comes from; None: `default_el2n_epoch`.
    Scores the tables lack columns for are left out, with a warning that says why.
    """
    chosen = default_el2n_epoch(len(tables)) if el2n_epoch is None else el2n_epoch
    accumulator = ActionAccumulator(split, el2n_epoch=chosen)
    # READ_AHEAD files are decoded at once, one thread each, while this thread sums the one before
    # (both release the GIL): on 2 cores as fast as pyarrow's own threaded read of the files alone.
    # At most READ_AHEAD + 1 tables are in memory.
    with ThreadPoolExecutor(READ_AHEAD) as readers:
        def read(epoch: int) -> Future[pa.Table]:
            name, local = tables[epoch]
            return readers.submit(read_epoch_table, local, name, threads=False, skip=accumulator.unused_columns(epoch))

        upcoming = deque(read(epoch) for epoch in range(min(READ_AHEAD, len(tables))))
        for epoch, (name, _) in enumerate(tqdm(tables, desc=f"score {split}", unit="epoch")):
            table = upcoming.popleft().result()
            if epoch + READ_AHEAD < len(tables):
                upcoming.append(read(epoch + READ_AHEAD))
            accumulator.update(epoch, table, name)
    scores = accumulator.compute()
    if accumulator.missing:
        reasons = defaultdict(list)
        for score, why in accumulator.missing.items():
            reasons[why].append(score)
        scores.attrs["missing"] = "; ".join(f"no {', '.join(names)}: {why}" for why, names in reasons.items())
        log.warning("split %r: %s", split, scores.attrs["missing"])
    return scores


def score_split_duckdb(split: str, tables: list[tuple[str, Path]], el2n_epoch: int | None = None) -> pd.DataFrame:
    """The loss sums from one DuckDB query over the split's files: for runs whose sums outgrow memory.

    Only `action`, `action_<part>` and `mean_loss`: the dynamics scores need the arrow engine.
    """
    from tracking.duckdb_scoring import score_tables_duckdb

    scores = score_tables_duckdb([local for _, local in tables], split)
    scores.attrs["missing"] = "no training-dynamics scores: the duckdb engine sums losses only (use --engine arrow)"
    log.warning("split %r: %s", split, scores.attrs["missing"])
    return scores


# Scoring engines by name (`--engine`): both give the scores table of the contract.
ENGINES: dict[str, Callable[[str, list[tuple[str, Path]], int | None], pd.DataFrame]] = {
    "arrow": score_split,
    "duckdb": score_split_duckdb,
}


def objectives(scores: pd.DataFrame) -> dict[str, str]:
    """Panel folder name -> score column: `loss` -> `action`, part `loc` -> `action_loc`."""
    found = {contract.LOSS: "action"}
    for column in scores.columns:
        if column.startswith("action_"):
            found[column[len("action_"):]] = column
    return found


def _check_ids_fit(scores: pd.DataFrame, size: int, dataset: str, split: str) -> None:
    """Refuse tables whose ids do not exist in the rebuilt data (the data changed or moved)."""
    ids = scores[contract.SAMPLE_ID]
    outside = ids[(ids < 0) | (ids >= size)]
    if len(outside):
        raise ActionScoresError(
            f"split {split!r}: the {dataset!r} data found has {size} samples but the tables have "
            f"sample ids {preview(outside)}; has the data changed? Point --data-root at the data the run used"
        )


@dataclass
class SplitView:
    """How to show a split's samples: their pictures, a caption line, an optional grouping column,
    and the split's size (named in panel titles when the scores cover only part of it)."""

    picture: Callable[[int], np.ndarray]
    label: Callable[[pd.Series], str]
    groups: str | None = None
    size: int | None = None


def classification_view(scores: pd.DataFrame, split_data: SplitData, dataset: str, split: str) -> SplitView:
    """Images captioned with their true label name, grouped by class.

    Adds `label` (from the data when the tables lack it) and `label_name` to `scores`;
    refuses ids or labels that the data does not have.
    """
    _check_ids_fit(scores, len(split_data.labels), dataset, split)
    if "label" not in scores:
        scores["label"] = split_data.labels[scores[contract.SAMPLE_ID].to_numpy()]
    labels = scores["label"].to_numpy()
    unknown = labels[(labels < 0) | (labels >= len(split_data.class_names))]
    if len(unknown):
        raise ActionScoresError(
            f"split {split!r}: labels {preview(np.unique(unknown))} have no class name (the {dataset!r} data has "
            f"{len(split_data.class_names)} classes): are these tables from another dataset?"
        )
    scores["label_name"] = [split_data.class_names[int(label)] for label in labels]
    return SplitView(split_data.image, lambda row: str(row["label_name"]), groups="label_name",
                     size=len(split_data.labels))


def _classification_view(scores: pd.DataFrame, dataset: str, split: str, data_root: str | None) -> SplitView:
    from tracking.data import load_split

    return classification_view(scores, load_split(dataset, split, data_root), dataset, split)


def _detection_view(scores: pd.DataFrame, dataset: str, split: str, data_root: str | None) -> SplitView:
    """Images with their ground-truth boxes drawn; adds `num_objects` and `median_box_size`
    (median sqrt(box area) / sqrt(image area)) to `scores`."""
    from tracking.detection_data import load_detection_split
    from tracking.panels import draw_boxes

    split_data = load_detection_split(dataset, split, data_root)
    _check_ids_fit(scores, len(split_data.dataset), dataset, split)
    counts, sizes = [], []
    for sample_id in tqdm(scores[contract.SAMPLE_ID], desc=f"boxes {split}", unit="image"):
        image, boxes, _ = split_data.dataset.scene(int(sample_id))
        side = (image.shape[0] * image.shape[1]) ** 0.5
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        counts.append(len(boxes))
        sizes.append(float(np.median(np.sqrt(areas)) / side) if len(boxes) else float("nan"))
    scores["num_objects"] = np.asarray(counts, dtype=np.int64)
    scores["median_box_size"] = sizes

    def picture(sample_id: int) -> np.ndarray:
        image, boxes, labels = split_data.dataset.scene(sample_id)
        return draw_boxes(image, boxes, [split_data.class_names[int(label)] for label in labels])

    def objects(row: pd.Series) -> str:
        count = int(row["num_objects"])
        return f"{count} object" + ("" if count == 1 else "s")

    return SplitView(picture, objects, size=len(split_data.dataset))


VIEWS: dict[str, Callable[[pd.DataFrame, str, str, str | None], SplitView]] = {
    "classification": _classification_view,
    "detection": _detection_view,
}


def render_split(scores: pd.DataFrame, view: SplitView, top_k: int, out_dir: Path
                 ) -> tuple[list[Path], dict[str, list[dict]]]:
    """Panels for every objective, and the same hardest/easiest samples as rows for `Tracker.log_samples`."""
    from tracking.panels import panel_items, ranked_panels
    from tracking.rank import easiest, hardest

    written: list[Path] = []
    samples: dict[str, list[dict]] = {}
    for objective, column in objectives(scores).items():
        written += ranked_panels(scores, column, top_k, out_dir / objective, view.picture, view.label, view.groups,
                                 split_size=view.size)
        for which, pick in (("hardest", hardest), ("easiest", easiest)):
            chosen = pick(scores, column, top_k)
            items = panel_items(chosen, column, view.picture, view.label)
            samples[f"{objective}/{which}"] = [
                {"image": item.image, "caption": item.caption, "sample_id": item.sample_id,
                 "rank": int(row["rank"]), column: float(row[column]), "label": view.label(row)}
                for item, (_, row) in zip(items, chosen.iterrows())
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
) -> AnalysisResult:
    """Score every tracked split of one run and log scores, panels, metrics and the status tag.

    A run already tagged done is skipped unless `force`. `data_root` overrides the data
    folder the run recorded, for data that has moved. `engine`: a name in `ENGINES`;
    `el2n_epoch`: see `score_split`. The run is held with `Tracker.job_lock` meanwhile:
    a second job on it fails, naming the first.
    """
    if top_k <= 0:
        raise ActionScoresError(f"top_k must be positive, got {top_k}")
    if engine not in ENGINES:
        raise ActionScoresError(f"unknown scoring engine {engine!r}; choose one of {sorted(ENGINES)}")
    tracker.attach(run_id)

    def skipped() -> AnalysisResult | None:
        if tracker.tags().get(contract.STATUS_TAG) == contract.STATUS_DONE and not force:
            return AnalysisResult(run_id, "skipped", message="already analysed (use force to redo)")
        return None

    if done := skipped():
        return done
    with tracker.job_lock():
        return skipped() or _analyze_locked(tracker, run_id, top_k, data_root, panels, engine,  # a job may just have finished
                                          el2n_epoch)


def _analyze_locked(tracker: Tracker, run_id: str, top_k: int, data_root: str | None, panels: bool,
                    engine: str, el2n_epoch: int | None) -> AnalysisResult:
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
    with tempfile.TemporaryDirectory(prefix="action-scores-job-") as work:
        local = download_all(tracker, [p for paths in by_split.values() for p in paths], Path(work) / "in")
        out = Path(work) / "out"
        metrics: dict[str, float] = {}
        samples: dict[str, list[dict]] = {}
        for split, paths in by_split.items():
            scores = ENGINES[engine](split, [(p, local[p]) for p in paths], el2n_epoch)
            if scores.attrs.get("missing"):
                result.message = "; ".join(filter(None, [result.message, f"split {split}: {scores.attrs['missing']}"]))
            split_out = out / split
            split_out.mkdir(parents=True)
            if panels and dataset:
                view = VIEWS[task](scores, dataset, split, data_root)
                written, split_samples = render_split(scores, view, top_k, split_out)
                if view.groups:
                    written.append(class_distribution(
                        scores, "action", view.groups, split_out / contract.LOSS / CLASS_DISTRIBUTION,
                        f"{split}: action per class ({len(scores)} samples, {scores['epochs'].iloc[0]} epochs)"))
                result.panels += [f"{contract.scores_dir(split)}/{p.relative_to(split_out).as_posix()}" for p in written]
                samples |= {f"{contract.scores_dir(split)}/{key}": rows for key, rows in split_samples.items()}
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
        if panels and not dataset:
            why = (f"no panels: the run does not record the param {contract.DATASET_PARAM!r}, "
                   "so its images cannot be rebuilt")
            result.message = "; ".join(filter(None, [result.message, why]))
            log.warning(why)
        tracker.log_artifacts(out, contract.SCORES_DIR)
    for key, rows in samples.items():
        tracker.log_samples(key, rows)
    tracker.log_metrics(metrics)
    tracker.set_tags({contract.STATUS_TAG: contract.STATUS_DONE})
    tracker.finish()  # flushes a resumed W&B run; a no-op for an attached MLflow run
    return result


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
