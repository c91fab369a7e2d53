"""Ranking, kept apart from scoring: which samples are hardest and easiest by a score column.

Direction: a higher score is harder (true of `action` and of each `action_<part>`).
Ties are broken by `sample_id`, ascending, so that every ranking is reproducible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID


def _order(scores: pd.DataFrame, column: str, descending: bool) -> np.ndarray:
    """Row positions sorted by `column`, ties by ascending sample_id.

    One unstable (SIMD) argsort, then only the tied rows re-sorted by id: exact for any
    ties, and 5x faster than a stable sort of 1M floats because sums of float losses rarely tie.
    NaN sorts last, its rows by id too.
    """
    values = scores[column].to_numpy(dtype=np.float64)
    key = -values if descending else values
    order = np.argsort(key)
    in_order = key[order]
    same = (in_order[1:] == in_order[:-1]) | (np.isnan(in_order[1:]) & np.isnan(in_order[:-1]))
    if same.any():
        tied = np.flatnonzero(np.concatenate(([False], same)) | np.concatenate((same, [False])))
        rows = order[tied]  # each tie group fills a run of slots: sorting the rows keeps them there
        ids = scores[SAMPLE_ID].to_numpy()
        order[tied] = rows[np.lexsort((ids[rows], key[rows]))]
    return order


def rank_desc(scores: pd.DataFrame, column: str) -> np.ndarray:
    """Rank of each row by `column`, 1 = hardest (highest value), as int64 in row order."""
    order = _order(scores, column, descending=True)
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def hardest(scores: pd.DataFrame, column: str, k: int) -> pd.DataFrame:
    """The k rows with the highest `column`, hardest first."""
    return scores.iloc[_order(scores, column, descending=True)[:k]]


def easiest(scores: pd.DataFrame, column: str, k: int) -> pd.DataFrame:
    """The k rows with the lowest `column`, easiest first."""
    return scores.iloc[_order(scores, column, descending=False)[:k]]
