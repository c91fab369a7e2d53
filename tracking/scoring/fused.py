"""The fused mislabel score: one number per sample from the registered scores of a scores table.

No single score finds flipped labels best everywhere (`bench/results/label_noise`: `action` and
`confidence` lead under symmetric noise, `aum` where the wrong label is a plausible class). The
fused score is a small logistic model over the registered scores of the split, each turned so that
higher = harder (`tracking.scoring.registry`) and standardised over the split (mean 0, standard
deviation 1): blind to each score's units and offset, so one set of weights serves every run.
(Per-split percentiles instead of standardised values lost the tails, where a near-perfect score
and the fusion differ: 0.0005 AUROC below the best single score on digits.)

The weights are fixed: fitted once by `bench/label_noise.py --fit-fused` (logistic regression on
synthetic label noise, symmetric and asymmetric, 20% and 40%, injected into copies of the digits
training split with seed 1; the benchmark measures seed 0). Output: the model's probability
that the sample is mislabeled; higher = harder. Deterministic: the same table gives the same scores.

Pure pandas and numpy over a scores table (`action_scores/<split>/scores.parquet`): no torch,
no tracker.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from tracking.errors import ActionScoresError
from tracking.scoring.registry import get

NAME = "fused"
HIGHER_IS_HARDER = True
DEFINITION = ("probability of a flipped label from a logistic model over the split's standardised action, aum, "
              "confidence, variability, correctness, forgetting and el2n, fitted on synthetic label noise")
# Fitted by `python bench/label_noise.py --fit-fused` (see there); the scores it reads, in order.
FEATURES = ("action", "aum", "confidence", "variability", "correctness", "forgetting", "el2n")
WEIGHTS = (0.7959, 0.3282, -0.6393, -1.2301, 2.0042, 0.9958, -0.0917)
INTERCEPT = -1.5283


def features(scores: pd.DataFrame, names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """(N, F): each score turned so that higher = harder (its registered direction), then standardised over
    the split (mean 0, standard deviation 1; a constant score gives 0)."""
    lacking = [name for name in names if name not in scores.columns]
    if lacking:
        raise ActionScoresError(
            f"the fused score needs the scores {list(names)}; this scores table lacks {lacking} (the run's "
            "tables have no column they read: record with tracking.record.classification_columns)"
        )
    columns = []
    for name in names:
        values = scores[name].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ActionScoresError(f"score {name!r} has NaN or infinite values: the fused score cannot use them")
        oriented = values if get(name).higher_is_harder else -values
        spread = oriented.std()
        columns.append((oriented - oriented.mean()) / spread if spread > 0 else np.zeros_like(oriented))
    return np.stack(columns, axis=1) if columns else np.empty((len(scores), 0))


def fused(scores: pd.DataFrame, weights: tuple[float, ...] = WEIGHTS, intercept: float = INTERCEPT) -> np.ndarray:
    """The fused score of every row of a scores table, in row order: higher = more likely mislabeled."""
    if scores.empty:
        raise ActionScoresError("no scores to fuse: the table is empty")
    logits = features(scores) @ np.asarray(weights, dtype=np.float64) + intercept
    return 1 / (1 + np.exp(-logits))


def fit(tables: list[pd.DataFrame], flipped: list[np.ndarray], c: float = 1.0) -> tuple[tuple[float, ...], float]:
    """Weights and intercept of the logistic model from scores tables whose flipped samples are known
    (`flipped[i]`: a bool mask in the row order of `tables[i]`); what `WEIGHTS` and `INTERCEPT` hold."""
    from sklearn.linear_model import LogisticRegression

    inputs = np.concatenate([features(table) for table in tables])
    model = LogisticRegression(C=c, max_iter=3000).fit(inputs, np.concatenate(flipped))
    return tuple(round(float(w), 4) for w in model.coef_[0]), round(float(model.intercept_[0]), 4)
