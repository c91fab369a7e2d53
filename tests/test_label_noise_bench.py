"""The label-noise bench's folds for cleanlab's out-of-sample probabilities: stratified, disjoint, complete, seeded."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def label_noise():
    sys.path.insert(0, str(ROOT / "bench"))
    import label_noise

    return label_noise


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_cleanlab_folds_are_stratified_disjoint_complete_and_seeded(label_noise, folds: int) -> None:
    labels = np.repeat(np.arange(4), [30, 60, 90, 120])  # unequal classes: stratification has to show
    held_out = label_noise.fold_indices(labels, folds, seed=3)
    assert len(held_out) == folds
    every = np.concatenate(held_out)
    assert np.array_equal(np.sort(every), np.arange(len(labels)))  # each sample held out exactly once
    for fold in held_out:
        counts = np.bincount(labels[fold], minlength=4)
        assert np.array_equal(counts, np.array([30, 60, 90, 120]) // folds)  # classes divide evenly here
    again = label_noise.fold_indices(labels, folds, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(held_out, again))
    other = label_noise.fold_indices(labels, folds, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(held_out, other))
