"""The one check of sample ids, for an epoch's table, a split's media and a framework's tracked dataset.

Every table of a run is keyed by `sample_id`, so each caller asks the same questions of its ids:
integers, in range, each once where repeats mean nothing, and all there where a table needs
every sample. The messages say which ids fail, so the same mistake reads the same everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tracking.errors import ActionScoresError, preview


def host_array(values: Any) -> np.ndarray:
    """A numpy array of a numpy array, a list, or a torch tensor on any device (without importing torch)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def checked_sample_ids(sample_ids: Any, what: str, num_samples: int | None = None, *, each_once: bool = False,
                       complete: bool = False, expected: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(ids, unique_ids, first)`: the ids as 1-D int64, the sorted distinct ids, and where each first came.

    Refuses, naming the ids and prefixing each message with `what` (e.g. ``split 'test'``): no ids;
    non-integers; ids below 0, or at or above `num_samples` when given; with `each_once`, repeats;
    with `complete`, any id of `expected` (default: all of ``[0, num_samples)``) missing, or any other id.
    """
    ids = host_array(sample_ids).reshape(-1)
    if ids.size == 0:
        raise ActionScoresError(f"{what}: sample_ids is empty; pass the ids of the samples")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ActionScoresError(f"{what}: sample_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if each_once:
        unique_ids, first, counts = np.unique(ids, return_index=True, return_counts=True)
    else:
        unique_ids, first = np.unique(ids, return_index=True)
    if num_samples is None:
        if (negative := unique_ids[unique_ids < 0]).size:
            raise ActionScoresError(f"{what}: sample ids must be >= 0, got {preview(negative)}")
    elif (outside := unique_ids[(unique_ids < 0) | (unique_ids >= num_samples)]).size:
        raise ActionScoresError(f"{what}: sample ids out of range [0, {num_samples}): {preview(outside)}")
    if each_once and (repeated := unique_ids[counts > 1]).size:
        raise ActionScoresError(f"{what}: sample ids {preview(repeated)} appear more than once; pass each sample once")
    if complete:
        # Distinct and in range: all of [0, num_samples) are there exactly when the count is right.
        whole = (unique_ids.size == num_samples if expected is None else np.array_equal(unique_ids, expected))
        if not whole:
            expected = np.arange(num_samples or 0) if expected is None else expected
            missing, unexpected = np.setdiff1d(expected, unique_ids), np.setdiff1d(unique_ids, expected)
            raise ActionScoresError(
                f"{what}: {missing.size} of {expected.size} samples missing: {preview(missing)}"
                + (f"; not among its ids: {preview(unexpected)}" if unexpected.size else "")
            )
    return ids, unique_ids, first
