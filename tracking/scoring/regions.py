"""Dataset Cartography's regions: each sample easy-to-learn, ambiguous or hard-to-learn, from its
`confidence` and `variability` (Swayamdipta et al., Dataset Cartography, EMNLP 2020, Fig. 1).

The rule, deterministic and computed from the registry's own `confidence` and `variability`
columns (never recomputed here):

- **ambiguous**: variability strictly above the cut, where the cut is the variability of the
  (n // 3 + 1)-th most variable sample: the top third by variability (fewer when samples tie at
  the cut, none when variability is 0 throughout, as after one epoch);
- of the rest, **easy-to-learn**: confidence >= 0.5 (the model gave the assigned label at least
  half the probability, on average over epochs);
- **hard-to-learn**: confidence < 0.5.

The paper draws the regions by eye and, to select data, takes the top third of each
score; here every sample gets exactly one region, so the samples that are not ambiguous are split at
confidence 0.5. Pure numpy: no torch, no tracker, no plotting.
"""

from __future__ import annotations

import numpy as np

from tracking.errors import ActionScoresError

REGION = "region"  # the column of the scores table
EASY, AMBIGUOUS, HARD = "easy-to-learn", "ambiguous", "hard-to-learn"
REGIONS = (EASY, AMBIGUOUS, HARD)
AMBIGUOUS_SHARE = 3  # the top 1/AMBIGUOUS_SHARE of the split by variability is ambiguous
EASY_CONFIDENCE = 0.5  # confidence at or above which a sample that is not ambiguous is easy-to-learn
NEEDS = ("confidence", "variability")  # the registered scores the rule reads


def variability_cut(variability: np.ndarray) -> float:
    """The variability above which a sample is ambiguous: that of the (n // 3 + 1)-th most variable sample."""
    values = np.asarray(variability, dtype=np.float64)
    if values.size == 0:
        raise ActionScoresError("no samples to place on the data map: the variability column is empty")
    position = values.size - values.size // AMBIGUOUS_SHARE - 1  # the (n // 3 + 1)-th largest, counted from below
    return float(np.partition(values, position)[position])


def assign(confidence: np.ndarray, variability: np.ndarray) -> np.ndarray:
    """Each sample's region (an object array of `REGIONS` strings), by the rule in the module docstring."""
    confidence = np.asarray(confidence, dtype=np.float64)
    variability = np.asarray(variability, dtype=np.float64)
    if confidence.shape != variability.shape:
        raise ActionScoresError(f"confidence {confidence.shape} and variability {variability.shape} must be "
                                "columns of the same scores table")
    if confidence.size == 0:
        return np.empty(0, dtype=object)
    regions = np.where(confidence >= EASY_CONFIDENCE, EASY, HARD).astype(object)
    regions[variability > variability_cut(variability)] = AMBIGUOUS
    return regions
