"""Ranking: hardest, easiest and rank in each registered score's direction, ties by ascending sample_id,
against plain Python sorts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tracking.errors import ActionScoresError
from tracking.scoring.rank import easiest, hardest, pick, rank


def test_hardest_and_easiest_order_with_ties() -> None:
    scores = pd.DataFrame({
        "sample_id": [7, 3, 11, 0, 5, 8],
        "action": [2.0, 5.0, 2.0, 5.0, 1.0, 2.0],
    })
    expected_hard = [int(s) for s, _ in sorted(zip(scores["sample_id"], scores["action"]), key=lambda p: (-p[1], p[0]))]
    expected_easy = [int(s) for s, _ in sorted(zip(scores["sample_id"], scores["action"]), key=lambda p: (p[1], p[0]))]
    assert expected_hard == [0, 3, 7, 8, 11, 5]
    assert expected_easy == [5, 7, 8, 11, 0, 3]
    assert hardest(scores, "action", 4)["sample_id"].tolist() == expected_hard[:4]
    assert easiest(scores, "action", 4)["sample_id"].tolist() == expected_easy[:4]
    assert hardest(scores, "action", 100)["sample_id"].tolist() == expected_hard
    # Whole rows come back, not just ids.
    assert hardest(scores, "action", 2)["action"].tolist() == [5.0, 5.0]
    ranks = dict(zip(scores["sample_id"], rank(scores, "action")))
    assert ranks == {s: i + 1 for i, s in enumerate(expected_hard)}
    in_id_order = scores.sort_values("sample_id")  # the job's own layout
    assert hardest(in_id_order, "action", 100)["sample_id"].tolist() == expected_hard
    assert easiest(in_id_order, "action", 100)["sample_id"].tolist() == expected_easy
    assert dict(zip(in_id_order["sample_id"], rank(in_id_order, "action"))) == ranks


def test_ranking_at_scale_breaks_every_tie_by_id_like_a_python_sort() -> None:
    """Tens of thousands of rows (the SIMD sort's range) with many tied values and some NaN,
    ids shuffled: the order must equal Python's sorted() on (value, id), NaN last."""
    rng = np.random.default_rng(3)
    size = 50_000
    values = rng.integers(0, 500, size).astype(np.float64) / 4  # ~100 rows per value
    values[rng.choice(size, 300, replace=False)] = np.nan
    values[rng.choice(size, 50, replace=False)] = -0.0
    scores = pd.DataFrame({"sample_id": rng.permutation(size * 3)[:size], "action": values})

    def python_order(descending: bool) -> list[int]:
        sign = -1.0 if descending else 1.0
        pairs = zip(scores["sample_id"].tolist(), scores["action"].tolist())
        return [i for i, v in sorted(pairs, key=lambda p: (np.isnan(p[1]), sign * p[1] if not np.isnan(p[1]) else 0.0, p[0]))]

    expected_hard, expected_easy = python_order(True), python_order(False)
    assert hardest(scores, "action", size)["sample_id"].tolist() == expected_hard
    assert easiest(scores, "action", size)["sample_id"].tolist() == expected_easy
    ranks = dict(zip(scores["sample_id"].tolist(), rank(scores, "action").tolist()))
    assert ranks == {sample: position + 1 for position, sample in enumerate(expected_hard)}


def test_each_score_ranks_in_its_registered_direction() -> None:
    """The hardest by aum are the lowest (likely mislabeled); by action, the highest."""
    scores = pd.DataFrame({"sample_id": [4, 1, 9, 2], "aum": [0.5, -2.0, 3.0, -2.0], "action": [0.5, -2.0, 3.0, -2.0]})
    assert hardest(scores, "aum", 3)["sample_id"].tolist() == [1, 2, 4]  # lowest first, the tie by id
    assert easiest(scores, "aum", 2)["sample_id"].tolist() == [9, 4]
    assert rank(scores, "aum").tolist() == [3, 1, 4, 2]
    assert hardest(scores, "action", 3)["sample_id"].tolist() == [9, 4, 1]
    assert rank(scores, "action").tolist() == [2, 3, 1, 4]


def test_a_column_outside_the_registry_needs_a_direction() -> None:
    scores = pd.DataFrame({"sample_id": [0, 1, 2], "my_score": [1.0, 3.0, 2.0]})
    with pytest.raises(ActionScoresError, match=r"column 'my_score' is not a registered score"):
        hardest(scores, "my_score", 1)
    assert hardest(scores, "my_score", 2, higher_is_harder=True)["sample_id"].tolist() == [1, 2]
    assert hardest(scores, "my_score", 2, higher_is_harder=False)["sample_id"].tolist() == [0, 2]
    assert rank(scores, "my_score", higher_is_harder=False).tolist() == [1, 3, 2]


def test_pick_ranks_once_overall_and_per_group() -> None:
    scores = pd.DataFrame({"sample_id": [0, 1, 2, 3, 4, 5], "label": [1, 0, 1, 0, 1, 0],
                           "confidence": [0.9, 0.2, 0.2, 0.6, 0.4, 0.95]})
    picked = pick(scores, "confidence", 2, groups="label")
    assert (picked.higher_is_harder, picked.direction, picked.samples) == (False, "lower = harder", 6)
    assert picked.hardest["sample_id"].tolist() == [1, 2]
    assert picked.easiest["sample_id"].tolist() == [5, 0]
    assert {label: (hard["sample_id"].tolist(), easy["sample_id"].tolist(), size)
            for label, (hard, easy, size) in picked.by_group.items()} == {0: ([1, 3], [5, 3], 3), 1: ([2, 4], [0, 4], 3)}
    assert pick(scores, "confidence", 2).by_group == {}
    with pytest.raises(ActionScoresError, match="k must be at least 1"):
        pick(scores, "confidence", 0)
    with pytest.raises(ActionScoresError, match="the table is empty"):
        pick(scores.iloc[:0], "confidence", 1)
