"""Sample ids that travel with the batch: wrap any dataset of `(input, target)` or dict items."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from tracking import contract
from tracking.errors import ActionScoresError


class IndexedDataset(Dataset):
    """Gives each item its `sample_id`, so ids travel with the batch: an `(input, target)` pair becomes
    ``{"sample_id", "input", "target"}``; a dict item keeps its own keys and gets ``"sample_id"`` beside them."""

    def __init__(self, dataset: Dataset, sample_ids: Sequence[int] | None = None) -> None:
        """`sample_ids`: the id of each item (default: its position), for a dataset that is a
        selection of a split whose ids keep their meaning (the original positions)."""
        self.dataset = dataset
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        sample_id = index if self.sample_ids is None else int(self.sample_ids[index])
        if isinstance(item, Mapping):
            if contract.SAMPLE_ID in item:
                raise ActionScoresError(
                    f"item {index} already has a {contract.SAMPLE_ID!r} key: its dataset carries its own ids, "
                    "so use it as it is, without IndexedDataset"
                )
            return {contract.SAMPLE_ID: sample_id, **item}
        if isinstance(item, (tuple, list)) and len(item) == 2:
            data, target = item
            return {contract.SAMPLE_ID: sample_id, "input": data, "target": target}
        shape = f"a {type(item).__name__} of {len(item)}" if isinstance(item, (tuple, list)) else \
            f"a {type(item).__name__}"
        raise ActionScoresError(f"item {index} is {shape}; IndexedDataset wraps (input, target) pairs or dicts")
