"""The fused mislabel score against its formula in numpy; determinism; the bench's hardness perturbations."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tracking.errors import ActionScoresError
from tracking.scoring import fused
from tracking.scoring.registry import SCORES

ROOT = Path(__file__).resolve().parents[1]


def _table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"sample_id": np.arange(n)})
    for name in fused.FEATURES:
        table[name] = rng.normal(size=n) * (1 + rng.random() * 5) + rng.normal() * 3
    return table


def test_fused_equals_its_formula_in_numpy() -> None:
    table = _table()
    logit = np.full(len(table), fused.INTERCEPT)
    for name, weight in zip(fused.FEATURES, fused.WEIGHTS):
        x = table[name].to_numpy() * (1 if SCORES[name].higher_is_harder else -1)
        logit += weight * (x - x.mean()) / x.std()
    np.testing.assert_allclose(fused.fused(table), 1 / (1 + np.exp(-logit)), rtol=1e-12)


def test_fused_is_deterministic_and_follows_the_samples_not_the_row_order() -> None:
    table = _table()
    first, second = fused.fused(table), fused.fused(table.copy())
    assert np.array_equal(first, second)
    shuffled = table.sample(frac=1, random_state=1)
    np.testing.assert_allclose(pd.Series(fused.fused(shuffled), index=shuffled["sample_id"]).sort_index(), first,
                               rtol=1e-12)


def test_fused_does_not_change_with_units_or_offsets() -> None:
    table = _table()
    moved = table.assign(action=table["action"] * 7 + 100, aum=table["aum"] * 0.01 - 3)
    np.testing.assert_allclose(fused.fused(moved), fused.fused(table), rtol=1e-9)


def test_fit_finds_weights_that_separate_known_flips() -> None:
    tables, masks = [], []
    for seed in range(3):
        table = _table(200, seed)
        flipped = np.zeros(200, dtype=bool)
        flipped[:40] = True
        table.loc[flipped, "aum"] -= 5 * table["aum"].std()  # lower aum = harder: the flipped rows are the hardest
        tables.append(table)
        masks.append(flipped)
    weights, intercept = fused.fit(tables, masks)
    assert weights[fused.FEATURES.index("aum")] == max(weights)
    scores = fused.fused(tables[0], weights, intercept)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(masks[0], scores) > 0.99


def test_missing_and_broken_scores_are_named() -> None:
    with pytest.raises(ActionScoresError, match=r"lacks \['el2n'\]"):
        fused.fused(_table().drop(columns="el2n"))
    broken = _table()
    broken.loc[3, "aum"] = np.nan
    with pytest.raises(ActionScoresError, match="score 'aum' has NaN"):
        fused.fused(broken)
    with pytest.raises(ActionScoresError, match="empty"):
        fused.fused(_table().iloc[:0])


@pytest.fixture(scope="module")
def hardness():
    sys.path.insert(0, str(ROOT / "bench"))
    import hardness

    return hardness


def test_every_hardness_perturbation_is_reproducible_from_its_seed(hardness) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.random((200, 1, 8, 8))
    labels = np.repeat(np.arange(10), 20)
    for kind in hardness.KINDS:
        first = hardness.perturb(inputs, labels, 10, kind, 0.1, seed=5)
        second = hardness.perturb(inputs, labels, 10, kind, 0.1, seed=5)
        other = hardness.perturb(inputs, labels, 10, kind, 0.1, seed=6)
        for a, b in zip(first, second):
            assert np.array_equal(a, b), kind
        new_inputs, new_labels, mask = first
        assert mask.sum() == 20, kind
        changed = (new_labels != labels) | (new_inputs != inputs).reshape(200, -1).any(axis=1)
        assert not changed[~mask].any(), kind  # only the perturbed samples differ
        if kind in hardness.MISLABELING:
            assert (new_labels[mask] != labels[mask]).all() and np.array_equal(new_inputs, inputs), kind
        else:
            assert np.array_equal(new_labels, labels) and changed[mask].all(), kind
        if kind != "instance":  # instance-dependent noise picks by the data, not the seed
            assert not np.array_equal(mask, other[2]), kind
