"""Sample ids that travel with the batch: wrap any `(input, target)` dataset."""

from __future__ import annotations

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps `(input, target)` items as `{"sample_id", "input", "target"}`, so ids travel with the batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        data, target = self.dataset[index]
        return {"sample_id": index, "input": data, "target": target}
