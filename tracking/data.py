"""Classification datasets by name: what experiments train on and what the job rebuilds images from.

A sample's id is its position in the split's canonical order, so the post-hoc job can
show sample 123 of a run long after training. Each loader returns a `SplitData`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tracking.errors import ActionScoresError

SPLITS = ("train", "test")
IN_MEMORY_LIMIT = 200_000  # images per split decoded once into memory; larger splits decode per item


@dataclass(frozen=True)
class SplitData:
    """One split: items `(float32 CxHxW input, int label)`, label names, labels by sample_id, and pictures."""

    dataset: Dataset
    class_names: list[str]
    labels: np.ndarray  # int64, the label of every sample_id
    picture: Callable[[int], np.ndarray]  # sample_id -> uint8 HxW or HxWx3, for panels

    def image(self, sample_id: int) -> np.ndarray:
        """The displayable picture of a sample (uint8 HxW grayscale or HxWx3 RGB)."""
        return self.picture(int(sample_id))


class IndexedDataset(Dataset):
    """Wraps `(input, target)` items as `{"sample_id", "input", "target"}`, so ids travel with the batch."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict:
        data, target = self.dataset[index]
        return {"sample_id": index, "input": data, "target": target}


class _ArrayDataset(Dataset):
    """uint8 NxHxW(xC) pictures served as float32 CxHxW in [0, 1] (or scaled by `scale`)."""

    def __init__(self, pictures: np.ndarray, labels: np.ndarray, scale: float = 1 / 255) -> None:
        self.pictures, self.labels, self.scale = pictures, labels, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        picture = torch.from_numpy(np.ascontiguousarray(self.pictures[index])).float() * self.scale
        picture = picture.unsqueeze(0) if picture.dim() == 2 else picture.permute(2, 0, 1)
        return picture, int(self.labels[index])


def _digits(split: str, root: str | None) -> SplitData:
    """scikit-learn's 8x8 digits with a fixed 1437/360 split (a seed-0 permutation, never the experiment's seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    chosen = np.sort(order[360:] if split == "train" else order[:360])
    pictures = np.round(digits.images[chosen] * (255 / 16)).astype(np.uint8)
    labels = digits.target[chosen].astype(np.int64)
    return SplitData(_ArrayDataset(pictures, labels), [str(d) for d in range(10)], labels,
                     lambda i: pictures[i])


def _cifar10(split: str, root: str | None) -> SplitData:
    """torchvision's CIFAR-10 loader; downloads where there is internet."""
    from torchvision.datasets import CIFAR10

    if not root:
        raise ActionScoresError("cifar10 needs --data-root: the folder to hold (or that holds) cifar-10-batches-py")
    try:
        cifar = CIFAR10(root, train=split == "train", download=True)
    except Exception as error:  # URLError, RuntimeError, ...: anything the download raises
        raise ActionScoresError(
            f"cifar10: could not download or find CIFAR-10 under {root} ({type(error).__name__}: {error}); "
            "without internet, put the python batches in <root>/cifar-10-batches-py, or use "
            "--dataset imagefolder --data-root <folder with train/<class>/ and test/<class>/>"
        ) from None
    labels = np.asarray(cifar.targets, dtype=np.int64)
    return SplitData(_ArrayDataset(cifar.data, labels), list(cifar.classes), labels, lambda i: cifar.data[i])


def _imagefolder(split: str, root: str | None) -> SplitData:
    """Any `<root>/<split>/<class>/<image>` layout; ids follow ImageFolder's sorted order."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not root:
        raise ActionScoresError("imagefolder needs --data-root: a folder with train/<class>/ and test/<class>/")
    folder = Path(root) / split
    if not folder.is_dir():
        raise ActionScoresError(f"imagefolder: {folder} not found; expected {root}/{split}/<class>/<image>")
    images = ImageFolder(str(folder))
    labels = np.asarray(images.targets, dtype=np.int64)

    def load(index: int) -> np.ndarray:
        with Image.open(images.samples[index][0]) as picture:
            return np.asarray(picture.convert("RGB"))

    if len(labels) <= IN_MEMORY_LIMIT:
        decoded = [load(i) for i in tqdm(range(len(labels)), desc=f"decode {split}", unit="image", leave=False)]
        if len({d.shape for d in decoded}) == 1:
            pictures = np.stack(decoded)
            return SplitData(_ArrayDataset(pictures, labels), list(images.classes), labels, lambda i: pictures[i])

    class _Lazy(Dataset):
        def __len__(self) -> int:
            return len(labels)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            return torch.from_numpy(load(index)).permute(2, 0, 1).float() / 255, int(labels[index])

    return SplitData(_Lazy(), list(images.classes), labels, load)


DATASETS: dict[str, Callable[[str, str | None], SplitData]] = {
    "digits": _digits,
    "cifar10": _cifar10,
    "imagefolder": _imagefolder,
}


def load_split(dataset: str, split: str, root: str | None = None) -> SplitData:
    """A split of a named dataset; unknown names and splits are errors that list the valid ones."""
    if dataset not in DATASETS:
        raise ActionScoresError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ActionScoresError(f"unknown split {split!r} of {dataset!r}; choose one of {list(SPLITS)}")
    return DATASETS[dataset](split, root)
