"""Ranking, kept apart from scoring: which samples are hardest and easiest by a score column.

Direction: a higher score is harder (true of `action` and of each `action_<part>`).
Ties are broken by `sample_id`, ascending, so that every ranking is reproducible.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID


def _order(scores: pd.DataFrame, column: str, descending: bool) -> np.ndarray:
    """Row positions sorted by `column`, ties by ascending sample_id."""
    values = scores[column].to_numpy(dtype=np.float64)
    key = -values if descending else values
    ids = scores[SAMPLE_ID].to_numpy()
    if np.all(ids[1:] > ids[:-1]):  # rows in id order (as the job makes them): a stable sort breaks ties by id
        return np.argsort(key, kind="stable")
    return np.lexsort((ids, key))


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
