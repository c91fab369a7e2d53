"""The one sample-id check: the same mistake reads the same in an epoch's table, a split's media and a
framework's tracked dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracking.errors import ActionScoresError
from tracking.integrations.session import check_sample_ids
from tracking.record.ids import checked_sample_ids


def test_ids_come_back_as_int64_with_the_sorted_distinct_ids_and_each_ones_first_position() -> None:
    ids, unique_ids, first = checked_sample_ids(torch.tensor([[3, 1], [1, 0]], dtype=torch.int32), "split 'x'", 4)
    assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 1, 0]
    assert unique_ids.tolist() == [0, 1, 3] and first.tolist() == [3, 1, 0]


@pytest.mark.parametrize("ids, options, message", [
    ([], {}, "^split 'x': sample_ids is empty; pass the ids of the samples$"),
    ([0.0], {}, "^split 'x': sample_ids must be integers, got dtype float64$"),
    ([True], {}, "^split 'x': sample_ids must be integers, got dtype bool$"),
    ([0, -2, -1], {}, r"^split 'x': sample ids must be >= 0, got \[-2, -1\]$"),
    ([0, 3, -1], {"num_samples": 3}, r"^split 'x': sample ids out of range \[0, 3\): \[-1, 3\]$"),
    ([0, 2, 2, 0], {"each_once": True}, r"^split 'x': sample ids \[0, 2\] appear more than once; pass each sample once$"),
    ([0, 2, 2], {"num_samples": 4, "complete": True}, r"^split 'x': 2 of 4 samples missing: \[1, 3\]$"),
    ([1, 2, 4], {"num_samples": 5, "complete": True, "expected": np.array([1, 3, 4])},
     r"^split 'x': 1 of 3 samples missing: \[3\]; not among its ids: \[2\]$"),
])
def test_each_mistake_is_named_with_the_ids_at_fault(ids: list, options: dict, message: str) -> None:
    with pytest.raises(ActionScoresError, match=message):
        checked_sample_ids(np.array(ids), "split 'x'", **options)


def test_a_framework_dataset_needs_each_position_once_with_the_recorders_messages() -> None:
    check_sample_ids("val", np.array([2, 0, 1]), 3)
    with pytest.raises(ActionScoresError, match=r"^split 'val': sample ids \[1\] appear more than once; "
                                                r"pass each sample once$"):
        check_sample_ids("val", np.array([0, 1, 1]), 3)
    with pytest.raises(ActionScoresError, match=r"^split 'val': 1 of 3 samples missing: \[2\]$"):
        check_sample_ids("val", np.array([0, 1]), 3)
    with pytest.raises(ActionScoresError, match=r"^split 'val': sample ids out of range \[0, 3\): \[5\]$"):
        check_sample_ids("val", np.array([0, 1, 5]), 3)
