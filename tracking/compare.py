"""Compare one score of several analysed runs of one split: how stable is "hard" across seeds and models?

Reads each run's `action_scores/<split>/scores.parquet`, then logs to a NEW run (tagged with its
sources): the Spearman rank correlation matrix of the score (default `action`), the overlap of
their top-k hardest in the score's direction (`tracking.scoring.registry`: the hardest by `aum`
are the lowest), both as a heatmap PNG, and a combined score, each sample's mean rank over the runs.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.report.plots import matrices
from tracking.scoring.rank import hardest, rank
from tracking.scoring.registry import direction_text, get, score_of_column
from tracking.scoring.tables import ScoresColumnMissing, read_scores, scores_files
from tracking.backends import Tracker

COMPARE_DIR = "action_scores_compare"
SOURCES_TAG = "action_scores.compare.sources"
SOURCE_TAG = "action_scores.compare.source.{index}"
SCORE = "action"  # the default score to compare


@dataclass
class Comparison:
    """What `compare_runs` found and where it logged it."""

    run_id: str  # the new run
    split: str
    spearman: pd.DataFrame  # run x run
    overlap: pd.DataFrame  # run x run: |top-k of both| / k
    combined: pd.DataFrame  # sample_id, one rank per run, mean_rank, rank (1 = hardest by mean rank)
    artifacts: list[str]
    score: str = SCORE  # the score compared


def _scored_splits(tracker: Tracker, run_id: str) -> set[str]:
    """Splits of a run that the job has scored."""
    tracker.attach(run_id)
    return set(scores_files(tracker.list_files(contract.SCORES_DIR)))


def _pick_split(tracker: Tracker, run_ids: list[str], split: str | None) -> str:
    """The split to compare: the one asked for, or the only one every run has scored."""
    found = {run_id: _scored_splits(tracker, run_id) for run_id in run_ids}
    unscored = [run_id for run_id, splits in found.items() if not splits]
    if unscored:
        raise ActionScoresError(f"runs {preview(unscored)} have no {contract.SCORES_DIR}/<split>/{contract.SCORES_FILE}: "
                                "run `action-scores analyze` on them first")
    if split is not None:
        lacking = [run_id for run_id, splits in found.items() if split not in splits]
        if lacking:
            raise ActionScoresError(f"split {split!r} is not scored in runs {preview(lacking)}")
        return split
    common = set.intersection(*found.values())
    if len(common) != 1:
        raise ActionScoresError(f"the runs share the scored splits {sorted(common)}: name one with --split")
    return common.pop()


def _read_scores(tracker: Tracker, run_ids: list[str], split: str, score: str, work: Path) -> pd.DataFrame:
    """One `score` column per run, indexed by sample_id; the runs must score the same samples."""
    columns = {}
    for run_id in tqdm(run_ids, desc="read scores", unit="run"):
        tracker.attach(run_id)
        try:
            table = read_scores(tracker, split, work / run_id, [contract.SAMPLE_ID, score])
        except ScoresColumnMissing as error:
            raise ActionScoresError(
                f"run {run_id} has no {score!r} in {contract.scores_dir(split)}/{contract.SCORES_FILE} "
                f"(its columns: {error.columns}): its tables lack what the score needs; compare another score with "
                "--score"
            ) from None
        columns[run_id] = table.to_pandas().set_index(contract.SAMPLE_ID)[score]
    reference = next(iter(columns.values())).index
    for run_id, column in columns.items():
        if not column.index.sort_values().equals(reference.sort_values()):
            raise ActionScoresError(
                f"run {run_id} scores other samples of split {split!r} than run {run_ids[0]}: "
                f"missing {preview(reference.difference(column.index))}, "
                f"unexpected {preview(column.index.difference(reference))}; compare runs of the same dataset and split"
            )
    return pd.DataFrame(columns).sort_index()


def spearman(scores: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation of every pair of columns (ties get their average rank)."""
    return scores.corr(method="spearman")


def top_k_overlap(scores: pd.DataFrame, k: int, higher_is_harder: bool = True) -> pd.DataFrame:
    """Fraction of the k hardest samples (ties by lower sample_id) that two runs share; `scores`:
    one column per run, indexed by sample_id."""
    tops = {}
    for run_id in scores.columns:
        frame = scores[run_id].rename("score").reset_index()
        tops[run_id] = set(hardest(frame, "score", k, higher_is_harder)[contract.SAMPLE_ID])
    return pd.DataFrame({a: {b: len(tops[a] & tops[b]) / k for b in scores.columns} for a in scores.columns},
                        index=scores.columns)[scores.columns]


def combined_ranks(scores: pd.DataFrame, higher_is_harder: bool = True) -> pd.DataFrame:
    """Each run's rank (1 = hardest), their mean, and the rank by that mean: a consensus difficulty."""
    frame = scores.reset_index()
    combined = pd.DataFrame({contract.SAMPLE_ID: frame[contract.SAMPLE_ID]})
    for run_id in scores.columns:
        combined[f"rank_{run_id}"] = rank(frame, run_id, higher_is_harder)
    combined["mean_rank"] = combined[[f"rank_{r}" for r in scores.columns]].mean(axis=1)
    combined["rank"] = rank(combined, "mean_rank", higher_is_harder=False)  # a low mean rank is hard
    return combined


def compare_runs(tracker: Tracker, run_ids: list[str], *, split: str | None = None, top_k: int = 50,
                 experiment: str | None = None, score: str = SCORE) -> Comparison:
    """Read the runs' `score` (a registered score, or `action_<part>`), compare them in its direction,
    and log the comparison to a new run of `experiment`."""
    harder = (score_of_column(score) or get(score)).higher_is_harder  # `get` refuses an unknown name, listing the valid
    if len(run_ids) < 2 or len(set(run_ids)) != len(run_ids):
        raise ActionScoresError(f"compare needs at least two different runs, got {run_ids}")
    if top_k <= 0:
        raise ActionScoresError(f"top_k must be positive, got {top_k}")
    chosen = _pick_split(tracker, run_ids, split)
    with tempfile.TemporaryDirectory(prefix="action-scores-compare-") as work:
        values = _read_scores(tracker, run_ids, chosen, score, Path(work) / "in")
        if top_k > len(values):
            raise ActionScoresError(f"top_k {top_k} is more than the {len(values)} samples of split {chosen!r}")
        correlation, overlap = spearman(values), top_k_overlap(values, top_k, harder)
        combined = combined_ranks(values, harder)
        out = Path(work) / "out"
        out.mkdir()
        correlation.to_csv(out / "spearman.csv")
        overlap.to_csv(out / "top_k_overlap.csv")
        combined.to_parquet(out / "combined.parquet", index=False)
        short = {run_id: run_id[:8] for run_id in run_ids}
        matrices([(f"Spearman rank correlation of {score}", correlation.rename(index=short, columns=short)),
                  (f"overlap of the top {top_k} hardest by {score} ({direction_text(harder)})",
                   overlap.rename(index=short, columns=short))],
                 out / "heatmap.png", f"split {chosen}: {len(values)} samples, {len(run_ids)} runs")
        off_diagonal = ~np.eye(len(run_ids), dtype=bool)
        tracker.start(experiment=experiment, run_name=f"compare-{chosen}")
        try:
            tracker.write_params({"split": chosen, "top_k": top_k, "runs": len(run_ids), "score": score})
            tracker.set_tags({SOURCES_TAG: ",".join(run_ids),
                              **{SOURCE_TAG.format(index=i): run_id for i, run_id in enumerate(run_ids)}})
            tracker.write_metrics({"spearman_mean": float(correlation.to_numpy()[off_diagonal].mean()),
                                 "spearman_min": float(correlation.to_numpy()[off_diagonal].min()),
                                 "top_k_overlap_mean": float(overlap.to_numpy()[off_diagonal].mean())})
            tracker.write_artifacts(out, f"{COMPARE_DIR}/{chosen}")
        except BaseException:
            tracker.finish(failed=True)
            raise
        tracker.finish()
        artifacts = sorted(f"{COMPARE_DIR}/{chosen}/{p.name}" for p in out.iterdir())
    return Comparison(tracker.run_id, chosen, correlation, overlap, combined, artifacts, score)
