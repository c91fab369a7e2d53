"""IndexedDataset: one sample-id wrapper for tuple and dict items alike."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tracking.errors import ActionScoresError
from tracking.record import IndexedDataset


class _Items(Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def test_dict_items_keep_their_own_keys_and_get_a_sample_id() -> None:
    items = [{"image": torch.full((2,), float(i)), "label": i % 2, "caption": f"c{i}"} for i in range(3)]
    batch = next(iter(DataLoader(IndexedDataset(_Items(items), sample_ids=[10, 20, 30]), batch_size=3)))
    assert list(batch) == ["sample_id", "image", "label", "caption"]
    assert batch["sample_id"].tolist() == [10, 20, 30]
    assert batch["image"].tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert batch["label"].tolist() == [0, 1, 0] and batch["caption"] == ["c0", "c1", "c2"]


def test_pairs_become_input_and_target() -> None:
    dataset = IndexedDataset(_Items([(torch.tensor([1.0]), 3), [torch.tensor([2.0]), 4]]))
    assert dataset[0] == {"sample_id": 0, "input": torch.tensor([1.0]), "target": 3}
    assert dataset[1]["sample_id"] == 1 and dataset[1]["target"] == 4


@pytest.mark.parametrize("item, message", [
    ({"sample_id": 5, "x": 1}, r"^item 0 already has a 'sample_id' key: its dataset carries its own ids, "
                               r"so use it as it is, without IndexedDataset$"),
    ((1, 2, 3), r"^item 0 is a tuple of 3; IndexedDataset wraps \(input, target\) pairs or dicts$"),
    (torch.zeros(2), r"^item 0 is a Tensor; IndexedDataset wraps \(input, target\) pairs or dicts$"),
])
def test_items_it_cannot_wrap_are_refused(item: object, message: str) -> None:
    with pytest.raises(ActionScoresError, match=message):
        IndexedDataset(_Items([item]))[0]
