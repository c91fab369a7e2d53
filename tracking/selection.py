"""Select samples of an analysed run by a score, log the selection to the run, and read it back.

    action-scores select --run-id <id> --split train --by aum --fraction 0.1
    mlflow run . -e classify -P exclude=<id>             # retrain without the run's latest selection
    mlflow run . -e classify -P relabel=<id>             # ... or with its suggested labels

A selection is the hardest samples of a split by one score, in that score's registered direction
(`tracking.scoring.registry`: the hardest by `aum` are the lowest), or by the fused mislabel score
(`tracking.scoring.fused`): a fraction of the split, or every sample at least as hard as a threshold.
It is logged as `action_scores/<split>/selections/selection_NNNN.parquet` (NNNN counts up, the
highest is the latest) with columns `sample_id`, the score, `rank` (1 = hardest of the split by that
score), `label` (the assigned label) and `suggested_label`: the model's most frequent prediction
over the epochs where it differs from `label`, else null. On MLflow the file is also a dataset input
of the run (context `selection`); on W&B a `dataset` artifact.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tracking import contract
from tracking.backends.base import Tracker
from tracking.errors import ActionScoresError
from tracking.scoring import fused as fused_score
from tracking.scoring.rank import rank
from tracking.scoring.registry import SCORES, direction_text, get
from tracking.scoring.tables import epoch_files, epoch_name, files_of, read_scores, scores_files, union_of_parts

SELECTIONS = "selections"
CONTEXT = "selection"  # the MLflow dataset input's context
SUGGESTED_LABEL = "suggested_label"
LABEL = "label"
# Tags of a run trained on another run's selection (the classify entry point's exclude/relabel); use:
# exclude or relabel. `.samples` beside them: how many ids were left out, or labels replaced.
SOURCE_RUN_TAG = "action_scores.selection.{use}.run"
SOURCE_FILE_TAG = "action_scores.selection.{use}.file"
SELECTION_PREFIX = "selection_"
LATEST_TAG = "action_scores.selection.latest.{split}"  # on the selected run: its newest selection file


def choices() -> list[str]:
    """What `--by` takes: every registered score and the fused score."""
    return [*SCORES, fused_score.NAME]


@dataclass
class Selection:
    """A selection and where it was logged."""

    run_id: str
    split: str
    by: str
    higher_is_harder: bool
    path: str  # artifact path of the parquet
    table: pd.DataFrame  # sample_id, <by>, rank, label, suggested_label; hardest first
    samples: int  # of the split
    message: str = ""  # what could not be done (no predictions recorded: no suggested labels)


def selections_dir(split: str) -> str:
    """Artifact folder of a split's selections."""
    return f"{contract.scores_dir(split)}/{SELECTIONS}"


def _check_amount(fraction: float | None, threshold: float | None) -> None:
    if (fraction is None) == (threshold is None):
        raise ActionScoresError("give exactly one of --fraction (a share of the split, e.g. 0.1) or --threshold "
                                "(every sample at least as hard as this value of the score)")
    if fraction is not None and not (0 < fraction <= 1):
        raise ActionScoresError(f"fraction must be in (0, 1], the share of the split to select; got {fraction}")
    if threshold is not None and not math.isfinite(threshold):
        raise ActionScoresError(f"threshold must be a finite number, got {threshold}")


def _check_by(by: str) -> None:
    if by not in choices():
        raise ActionScoresError(f"unknown score {by!r} to select by; valid: {', '.join(choices())}")


def choose(scores: pd.DataFrame, by: str, fraction: float | None = None, threshold: float | None = None
           ) -> pd.DataFrame:
    """The selected rows of a scores table (which must hold `by`), hardest first: `sample_id`, `by`, `rank`.

    `fraction`: the round(fraction * N) hardest (at least one); `threshold`: every sample at least as
    hard as it (>= for a higher = harder score, <= otherwise). Ties are broken by lower sample_id.
    """
    _check_by(by)
    _check_amount(fraction, threshold)
    if by not in scores.columns:
        raise ActionScoresError(f"the scores table has no {by!r} (its columns: {list(scores.columns)}): the run's "
                                "tables lack what the score reads; select by another score")
    harder = _higher_is_harder(by)
    ranked = pd.DataFrame({contract.SAMPLE_ID: scores[contract.SAMPLE_ID].to_numpy(), by: scores[by].to_numpy()})
    ranked["rank"] = rank(ranked, by, harder)
    ranked = ranked.sort_values("rank", kind="stable")
    if fraction is not None:
        return ranked.head(max(1, round(fraction * len(ranked)))).reset_index(drop=True)
    values = ranked[by].to_numpy(dtype=np.float64)
    chosen = ranked[values >= threshold] if harder else ranked[values <= threshold]
    if chosen.empty:
        raise ActionScoresError(
            f"no sample is at least as hard as {threshold} by {by} ({direction_text(harder)}; its values run from "
            f"{values.min():.4g} to {values.max():.4g}): choose another threshold"
        )
    return chosen.reset_index(drop=True)


def _higher_is_harder(by: str) -> bool:
    return fused_score.HIGHER_IS_HARDER if by == fused_score.NAME else get(by).higher_is_harder


def most_frequent_prediction(tables: list[pd.DataFrame]) -> pd.Series:
    """Each sample's most frequent `prediction` over epoch tables (ties: the lowest class), by sample_id."""
    ids = tables[0][contract.SAMPLE_ID].to_numpy()
    order = np.argsort(ids)
    predictions = np.stack([table.set_index(contract.SAMPLE_ID)[contract.PREDICTION].reindex(ids[order]).to_numpy()
                            for table in tables])  # epochs x samples, in id order
    counts = np.zeros((predictions.shape[1], int(predictions.max()) + 1), dtype=np.int64)
    for epoch in predictions:
        counts[np.arange(len(epoch)), epoch] += 1
    return pd.Series(counts.argmax(axis=1), index=ids[order], name=contract.PREDICTION)


def suggested_labels(chosen: pd.DataFrame, labels: pd.Series, predictions: pd.Series | None) -> pd.DataFrame:
    """`chosen` with `label` and `suggested_label` (nullable Int64: null where the most frequent
    prediction is the label, or unknown)."""
    ids = chosen[contract.SAMPLE_ID]
    out = chosen.assign(**{LABEL: labels.reindex(ids).astype("Int64").to_numpy()})
    if predictions is None:
        out[SUGGESTED_LABEL] = pd.array([pd.NA] * len(out), dtype="Int64")
        return out
    suggested = pd.Series(predictions.reindex(ids).to_numpy(), dtype="Int64")
    out[SUGGESTED_LABEL] = suggested.mask(suggested == pd.Series(out[LABEL].to_numpy(), dtype="Int64")).array
    return out


def _scored(tracker: Tracker, run_id: str, split: str | None) -> str:
    """The split to select from: the one named, or the only one the job scored."""
    scored = list(scores_files(tracker.list_files(contract.SCORES_DIR)))
    if split:
        if split not in scored:
            raise ActionScoresError(f"run {run_id} has no scores of split {split!r} (scored: {scored}); "
                                    "name one of those with --split")
        return split
    if len(scored) != 1:
        raise ActionScoresError(f"run {run_id} has the scored splits {scored}: name one with --split")
    return scored[0]


def _predictions(tracker: Tracker, split: str, work: Path) -> pd.Series | None:
    """The most frequent prediction of each sample, from the run's epoch tables (a sharded epoch: the union of
    its parts, `union_of_parts`); None without `prediction`."""
    import pyarrow.parquet as pq

    tables = []
    for epoch in epoch_files(tracker.list_files(contract.losses_dir(split))).get(split, []):
        parts = []
        for path in files_of(epoch):
            local = tracker.download(path, work)
            if contract.PREDICTION not in pq.read_schema(local).names:
                return None
            parts.append((path, pq.read_table(local, columns=[contract.SAMPLE_ID, contract.PREDICTION])))
        table = union_of_parts(parts, epoch_name(epoch)) if isinstance(epoch, list) else parts[0][1]
        tables.append(table.to_pandas())
    return most_frequent_prediction(tables) if tables else None


def select_run(tracker: Tracker, run_id: str, *, by: str, split: str | None = None, fraction: float | None = None,
               threshold: float | None = None) -> Selection:
    """Choose the hardest samples of an analysed run's split by `by` and log the selection to the run.

    Arguments are checked before the run is read, and everything is read and computed before
    anything is written.
    """
    _check_by(by)
    _check_amount(fraction, threshold)
    tracker.attach(run_id)
    if tracker.tags().get(contract.STATUS_TAG) != contract.STATUS_DONE:
        raise ActionScoresError(f"run {run_id} is not analysed (no tag {contract.STATUS_TAG}={contract.STATUS_DONE}): "
                                f"run `action-scores analyze --run-id {run_id}` first")
    chosen_split = _scored(tracker, run_id, split)
    with tempfile.TemporaryDirectory(prefix="action-scores-select-") as work:
        scores = read_scores(tracker, chosen_split, Path(work) / "in").to_pandas()
        if by == fused_score.NAME:
            scores[by] = fused_score.fused(scores)
        chosen = choose(scores, by, fraction, threshold)
        labels = scores.set_index(contract.SAMPLE_ID)[LABEL] if LABEL in scores.columns else pd.Series(dtype="Int64")
        predictions = _predictions(tracker, chosen_split, Path(work) / "in")
        table = suggested_labels(chosen, labels, predictions)
        message = "" if predictions is not None else (
            f"split {chosen_split!r}: the tables have no {contract.PREDICTION!r} column, so no suggested labels "
            "(record with tracking.record.classification_columns)")
        folder = selections_dir(chosen_split)
        with tracker.job_lock():
            try:
                name = f"{SELECTION_PREFIX}{next_number(tracker.list_files(folder)):04d}.parquet"
                local = Path(work) / "out" / name
                local.parent.mkdir(parents=True)
                table.to_parquet(local, index=False)
                tracker.write_dataset(local, folder, name=f"{chosen_split}-{by}-{Path(name).stem}", context=CONTEXT)
                tracker.set_tags({LATEST_TAG.format(split=chosen_split): f"{folder}/{name}"})
            finally:
                tracker.finish()  # whatever happens: closes a resumed W&B run; a no-op for an attached MLflow run
    return Selection(run_id, chosen_split, by, _higher_is_harder(by), f"{folder}/{name}", table, len(scores), message)


def selection_number(path: str) -> int | None:
    """The number of a `selection_NNNN.parquet` path (any count of digits), None for another file."""
    stem, suffix = Path(path).stem, Path(path).suffix
    number = stem[len(SELECTION_PREFIX):]
    return int(number) if stem.startswith(SELECTION_PREFIX) and suffix == ".parquet" and number.isdigit() else None


def next_number(paths: list[str]) -> int:
    """The number after the highest selection among `paths`: by value, so 10000 comes after 9999."""
    return max((n for n in map(selection_number, paths) if n is not None), default=0) + 1


def latest_selection(tracker: Tracker, run_id: str, split: str) -> tuple[str, pd.DataFrame]:
    """(artifact path, table) of the newest selection of `split` in run `run_id`."""
    tracker.attach(run_id)
    folder = selections_dir(split)
    found = sorted((p for p in tracker.list_files(folder) if selection_number(p) is not None), key=selection_number)
    if not found:
        others = sorted({p.split("/")[1] for p in tracker.list_files(contract.SCORES_DIR) if f"/{SELECTIONS}/" in p})
        raise ActionScoresError(
            f"run {run_id} has no selection of split {split!r} under {folder}/ (splits with one: {others}); make one "
            f"with `action-scores select --run-id {run_id} --split {split} --by fused --fraction 0.1`"
        )
    with tempfile.TemporaryDirectory(prefix="action-scores-selection-") as work:
        return found[-1], pd.read_parquet(tracker.download(found[-1], work))


def describe(selection: Selection, tracker: Tracker) -> str:
    """What a user reads after `select`: how many, by what, where it is, how to retrain."""
    table = selection.table
    relabelled = int(table[SUGGESTED_LABEL].notna().sum())
    head = ", ".join(str(i) for i in table[contract.SAMPLE_ID].head(10))
    lines = [f"run {selection.run_id}: selected {len(table)} of {selection.samples} samples of split "
             f"{selection.split!r} by {selection.by} ({direction_text(selection.higher_is_harder)}); hardest first: "
             f"{head}{' ...' if len(table) > 10 else ''}",
             f"  {relabelled} with a suggested label (the model's most frequent prediction differs from the label)",
             f"  selection: {tracker.artifact_uri(selection.path)}",
             f"  retrain without them: mlflow run . -e classify -P exclude={selection.run_id}   "
             f"(or -P relabel={selection.run_id})"]
    if selection.message:
        lines.insert(1, f"  {selection.message}")
    return "\n".join(lines)
