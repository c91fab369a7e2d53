"""Sample ids that travel with the batch: wrap any `(input, target)` dataset."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps `(input, target)` items as `{"sample_id", "input", "target"}`, so ids travel with the batch."""

    def __init__(self, dataset: Dataset, sample_ids: Sequence[int] | None = None) -> None:
        """`sample_ids`: the id of each item (default: its position), for a dataset that is a
        selection of a split whose ids keep their meaning (the original positions)."""
        self.dataset = dataset
        self.sample_ids = sample_ids

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        data, target = self.dataset[index]
        sample_id = index if self.sample_ids is None else int(self.sample_ids[index])
        return {"sample_id": sample_id, "input": data, "target": target}
