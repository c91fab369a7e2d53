"""Ranking, kept apart from scoring: which samples are hardest and easiest by a score column.

Direction: each registered score's own (`tracking.scoring.registry`): the hardest by `action`
are the highest, the hardest by `aum` the lowest. A column that is no registered score needs
an explicit `higher_is_harder`. Ties are broken by `sample_id`, ascending, so that every
ranking is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID
from tracking.errors import ActionScoresError
from tracking.scoring.registry import direction_text, higher_is_harder as registered_direction


def _order(scores: pd.DataFrame, column: str, descending: bool) -> np.ndarray:
    """Row positions sorted by `column`, ties by ascending sample_id; NaN sorts last, its rows by id too."""
    values = scores[column].to_numpy(dtype=np.float64)
    return np.lexsort((scores[SAMPLE_ID].to_numpy(), -values if descending else values))


def rank(scores: pd.DataFrame, column: str, higher_is_harder: bool | None = None) -> np.ndarray:
    """Rank of each row by `column`, 1 = hardest, as int64 in row order.

    `higher_is_harder`: None takes the registered score's direction.
    """
    order = _order(scores, column, descending=registered_direction(column, higher_is_harder))
    ranks = np.empty(len(scores), dtype=np.int64)
    ranks[order] = np.arange(1, len(scores) + 1)
    return ranks


def hardest(scores: pd.DataFrame, column: str, k: int, higher_is_harder: bool | None = None) -> pd.DataFrame:
    """The k hardest rows by `column`, hardest first (highest, or lowest for a higher = easier score)."""
    return scores.iloc[_order(scores, column, descending=registered_direction(column, higher_is_harder))[:k]]


def easiest(scores: pd.DataFrame, column: str, k: int, higher_is_harder: bool | None = None) -> pd.DataFrame:
    """The k easiest rows by `column`, easiest first."""
    return scores.iloc[_order(scores, column, descending=not registered_direction(column, higher_is_harder))[:k]]


@dataclass
class Picked:
    """The rows a score's panels show, ranked once: over the split and, with `groups`, per group."""

    column: str
    higher_is_harder: bool
    samples: int  # rows ranked
    hardest: pd.DataFrame
    easiest: pd.DataFrame
    by_group: dict[object, tuple[pd.DataFrame, pd.DataFrame, int]]  # group -> (hardest, easiest, its size)

    @property
    def direction(self) -> str:
        return direction_text(self.higher_is_harder)


def pick(scores: pd.DataFrame, column: str, k: int, groups: str | None = None,
         higher_is_harder: bool | None = None) -> Picked:
    """The k hardest and k easiest rows by `column` (and per value of the `groups` column, sorted)."""
    if k < 1:
        raise ActionScoresError(f"k must be at least 1 to draw a panel, got {k}")
    if scores.empty:
        raise ActionScoresError(f"no scores to draw panels of {column!r} from: the table is empty")
    harder = registered_direction(column, higher_is_harder)
    by_group = {} if groups is None else {
        name: (hardest(group, column, k, harder), easiest(group, column, k, harder), len(group))
        for name, group in scores.groupby(groups, sort=True)
    }
    return Picked(column, harder, len(scores), hardest(scores, column, k, harder), easiest(scores, column, k, harder),
                  by_group)
