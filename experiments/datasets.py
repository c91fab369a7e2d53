"""Classification datasets by name: what experiments train on, and their media for the panels.

A sample's id is its position in the split's canonical order. Training records each tracked split's
pictures and label names (`record_split_media`), so the post-hoc job draws panels without the data;
for runs recorded before that, `split_view` rebuilds them (the entry points `action_scores.views`).
Each loader returns a `SplitData`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from tracking.errors import ActionScoresError
from tracking.record import LossRecorder, MediaSummary
from tracking.report.views import SplitView, classification_view

SPLITS = ("train", "test")
DIGITS_TEST_SIZE = 360  # of scikit-learn's 1797 digits; the rest is train
IN_MEMORY_LIMIT = 200_000  # images per split decoded once into memory; larger splits decode per item
IN_MEMORY_BYTES = 4 * 2**30  # ...unless their pixels would not fit comfortably in RAM


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


class _ArrayDataset(Dataset):
    """Pictures held in memory (uint8 HxW or HxWxC each) served as float32 CxHxW, times `scale`."""

    def __init__(self, pictures: np.ndarray | Sequence[np.ndarray], labels: np.ndarray, scale: float = 1 / 255) -> None:
        self.pictures, self.labels, self.scale = pictures, labels, scale

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _to_input(self.pictures[index], self.scale), int(self.labels[index])


def _to_input(picture: np.ndarray, scale: float = 1 / 255) -> torch.Tensor:
    """uint8 HxW or HxWxC -> float32 CxHxW (what ToTensor gives for scale 1/255)."""
    tensor = torch.from_numpy(np.ascontiguousarray(picture)).float() * scale
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)


def _digits(split: str, root: str | None) -> SplitData:
    """scikit-learn's 8x8 digits with a fixed 1437/360 split (a seed-0 permutation, never the experiment's seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    chosen = np.sort(order[DIGITS_TEST_SIZE:] if split == "train" else order[:DIGITS_TEST_SIZE])
    pixels = digits.images[chosen].astype(np.uint8)  # integers 0..16
    pictures = np.round(pixels * (255 / 16)).astype(np.uint8)
    labels = digits.target[chosen].astype(np.int64)
    return SplitData(_ArrayDataset(pixels, labels, scale=1 / 16), [str(d) for d in range(10)], labels,
                     lambda i: pictures[i])


def _cifar10(split: str, root: str | None) -> SplitData:
    """torchvision's CIFAR-10 loader; downloads where there is internet, else uses a local copy under root."""
    from torchvision.datasets import CIFAR10

    if not root:
        raise ActionScoresError("cifar10 needs a data folder: pass --data-root (it holds, or will hold, "
                                "cifar-10-batches-py)")
    try:
        cifar = CIFAR10(root, train=split == "train", download=True)
    except Exception as error:  # noqa: BLE001 - URLError, RuntimeError, TarError...: any failure gets the remedy
        raise ActionScoresError(
            f"cifar10: could not download or find CIFAR-10 under {root}: the download failed (no internet?) "
            f"({type(error).__name__}: {error}). To use a local copy, put the CIFAR-10 python batches in "
            f"{Path(root) / 'cifar-10-batches-py'}, or use "
            "--dataset imagefolder --data-root <folder with train/<class>/ and test/<class>/>"
        ) from None
    labels = np.asarray(cifar.targets, dtype=np.int64)
    return SplitData(_ArrayDataset(cifar.data, labels), list(cifar.classes), labels, lambda i: cifar.data[i])


class _LazyImages(Dataset):
    """Decodes each image file when asked: for splits too large to hold in memory."""

    def __init__(self, files: list[str], labels: np.ndarray) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def picture(self, index: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.files[index]) as image:
            return np.array(image.convert("RGB"))  # writable, so torch.from_numpy need not warn

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return _to_input(self.picture(index)), int(self.labels[index])


def _imagefolder(split: str, root: str | None) -> SplitData:
    """Any `<root>/<split>/<class>/<image>` layout; ids follow ImageFolder's sorted order.

    Training re-reads every image every epoch, so a split is decoded once into memory
    unless it is too large; then each item is decoded when asked.
    """
    from torchvision.datasets import ImageFolder

    expected = "<root>/train/<class>/<image> and <root>/test/<class>/<image>"
    if not root:
        raise ActionScoresError(f"imagefolder needs --data-root: a folder laid out as {expected}")
    if not Path(root).is_dir():
        raise ActionScoresError(f"imagefolder: data root {root} not found; pass --data-root a folder laid out as "
                                f"{expected}")
    folder = Path(root) / split
    if not folder.is_dir():
        raise ActionScoresError(f"imagefolder: {folder} not found; expected {root}/{split}/<class>/<image>")
    try:
        images = ImageFolder(str(folder))
    except FileNotFoundError as error:  # no class folders, or no image files in them
        raise ActionScoresError(f"imagefolder: no images under {folder} ({error}); "
                                f"expected {folder}/<class>/<image>") from None
    labels = np.asarray(images.targets, dtype=np.int64)
    lazy = _LazyImages([path for path, _ in images.samples], labels)
    classes = list(images.classes)
    if len(labels) > IN_MEMORY_LIMIT or lazy.picture(0).nbytes * len(labels) > IN_MEMORY_BYTES:
        return SplitData(lazy, classes, labels, lazy.picture)

    progress = tqdm(range(len(labels)), desc=f"decode {Path(root).name}/{split}", unit="image")
    decoded = [lazy.picture(i) for i in progress]
    pictures = np.stack(decoded) if len({d.shape for d in decoded}) == 1 else decoded
    return SplitData(_ArrayDataset(pictures, labels), classes, labels, lambda i: pictures[i])


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


class _Selected(Dataset):
    """Some items of a dataset, in id order, with some labels replaced: a split trained on a selection."""

    def __init__(self, dataset: Dataset, sample_ids: np.ndarray, new_labels: Mapping[int, int]) -> None:
        self.dataset, self.sample_ids, self.new_labels = dataset, sample_ids, new_labels

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample_id = int(self.sample_ids[index])
        data, label = self.dataset[sample_id]
        if sample_id not in self.new_labels:
            return data, label
        new = self.new_labels[sample_id]  # of the dataset's own label type, so that batches collate
        return data, torch.as_tensor(new, dtype=label.dtype) if isinstance(label, torch.Tensor) else new


def select_samples(dataset: Dataset, classes: int, exclude: Sequence[int] = (),
                   new_labels: Mapping[int, int] | None = None) -> tuple[Dataset, np.ndarray]:
    """`dataset` without the `exclude` ids and with `new_labels` (sample id -> class) in place of theirs.

    Returns the dataset and the sorted original id of each of its items (`train_and_record(sample_ids=)`),
    so that ids keep their meaning. Ids outside the split or labels outside [0, classes) are errors: the
    selection was made on another dataset.
    """
    size = len(dataset)  # type: ignore[arg-type]
    excluded = np.unique(np.asarray(list(exclude), dtype=np.int64))
    new_labels = {int(k): int(v) for k, v in (new_labels or {}).items()}
    strangers = [i for i in [*excluded.tolist(), *new_labels] if not 0 <= i < size]
    if strangers:
        raise ActionScoresError(f"the selection names sample ids outside this split of {size} samples: "
                                f"{sorted(set(strangers))[:10]}; was it made on another dataset?")
    bad = {i: y for i, y in new_labels.items() if not 0 <= y < classes}
    if bad:
        raise ActionScoresError(f"suggested labels outside the {classes} classes: {dict(list(bad.items())[:10])}")
    kept = np.setdiff1d(np.arange(size, dtype=np.int64), excluded)
    if kept.size == 0:
        raise ActionScoresError("the selection leaves out every sample of the split: nothing to train on")
    return _Selected(dataset, kept, new_labels), kept


def record_split_media(recorder: LossRecorder, sample_ids: np.ndarray, split: SplitData) -> MediaSummary:
    """Record the pictures and label names of `sample_ids` (the data's own labels) with the split's recorder."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    return recorder.record_media(ids, labels=[split.class_names[int(label)] for label in split.labels[ids]],
                                 images=[split.image(int(i)) for i in ids])


def split_view(dataset: str, split: str, sample_ids: np.ndarray, data_root: str | None) -> SplitView:
    """The panels' view of a run recorded without media: the split rebuilt, its pictures captioned by class."""
    data = load_split(dataset, split, data_root)
    return classification_view(sample_ids, data.image, data.labels, data.class_names, dataset, split)
