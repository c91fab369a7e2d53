"""Detection datasets: items are (image CxHxW in [0, 1], {"boxes", "labels"}), rebuildable by sample_id.

- `digit-scenes`: an embedded default made on the fly from scikit-learn's digits: canvases
  with 1 to `max_digits` digits at several sizes, with their boxes. Scene i of a split is
  drawn from a generator seeded by (split, i), so it is the same on every machine and run.
- `voc2007`: PASCAL VOC 2007 through torchvision's `VOCDetection` from a local root.

Labels are 1-based (0 is the background class of SSD); `class_names[0]` is "background".
Training records each tracked split's thumbnails with their boxes and class names
(`record_detection_media`); `split_view` rebuilds the scenes for runs recorded before that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tracking.errors import ActionScoresError
from tracking.record import LossRecorder, MediaSummary
from tracking.report.views import SplitView, detection_view

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


@dataclass(frozen=True)
class SceneSpec:
    """How digit scenes are drawn; the defaults are the embedded dataset's."""

    canvas: int = 128
    max_digits: int = 6
    min_size: int = 12
    max_size: int = 56
    train_scenes: int = 1200
    val_scenes: int = 300


_SPLIT_SEEDS = {"train": 1, "val": 2}


def draw_scene(
    spec: SceneSpec, split: str, index: int, digits: np.ndarray, digit_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scene `index` of `split`: (uint8 HxWx3 image, float32 (n, 4) boxes x1y1x2y2, int64 (n,) labels 1-based).

    Digits (8x8, values 0..16) are upscaled to a random size and placed without overlap.
    """
    from PIL import Image

    rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
    canvas = (rng.random((spec.canvas, spec.canvas)) * 40).astype(np.float32)
    wanted = int(rng.integers(1, spec.max_digits + 1))
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(wanted * 20):
        if len(boxes) == wanted:
            break
        size = int(rng.integers(spec.min_size, spec.max_size + 1))
        x, y = (int(v) for v in rng.integers(0, spec.canvas - size + 1, size=2))
        if any(x < b[2] and b[0] < x + size and y < b[3] and b[1] < y + size for b in boxes):
            continue
        pick = int(rng.integers(len(digits)))
        glyph = Image.fromarray((digits[pick] * (255 / 16)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        canvas[y : y + size, x : x + size] = np.maximum(canvas[y : y + size, x : x + size], np.asarray(glyph))
        boxes.append([x, y, x + size, y + size])
        labels.append(int(digit_labels[pick]) + 1)
    image = np.repeat(canvas.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


class DetectionDataset(Dataset):
    """Items `(image float CxHxW in [0, 1], {"boxes", "labels"})`; `scene(i)` gives the raw picture and boxes."""

    def __init__(self, size: int, load) -> None:  # load: index -> (uint8 HxWx3, boxes, labels)
        self._size = size
        self._load = load

    def __len__(self) -> int:
        return self._size

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(uint8 HxWx3 image, (n, 4) boxes, (n,) 1-based labels) of sample `index`."""
        if not 0 <= index < self._size:
            raise IndexError(f"sample {index} out of range [0, {self._size})")
        return self._load(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, boxes, labels = self.scene(index)
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
        return tensor, {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels)}


def digit_scenes(split: str, spec: SceneSpec = SceneSpec()) -> DetectionDataset:
    """The embedded `digit-scenes` split ("train" or "val"): digits of the matching digits split."""
    from sklearn.datasets import load_digits

    if split not in _SPLIT_SEEDS:
        raise ActionScoresError(f"digit-scenes has splits {sorted(_SPLIT_SEEDS)}, not {split!r}")
    digits = load_digits()
    # Train scenes use digits the val scenes never show, so val measures generalisation.
    order = np.random.default_rng(0).permutation(len(digits.target))
    pool = np.sort(order[360:] if split == "train" else order[:360])
    images, labels = digits.images[pool], digits.target[pool]
    size = spec.train_scenes if split == "train" else spec.val_scenes
    return DetectionDataset(size, lambda i: draw_scene(spec, split, i, images, labels))


def voc2007(split: str, root: str | None) -> DetectionDataset:
    """PASCAL VOC 2007 `train` or `val` from a local `root` holding VOCdevkit/VOC2007 (nothing is downloaded)."""
    from torchvision.datasets import VOCDetection

    if root is None:
        raise ActionScoresError("voc2007 needs --data-root: the folder that holds VOCdevkit/VOC2007")
    expected = Path(root) / "VOCdevkit" / "VOC2007"
    if not expected.is_dir():
        raise ActionScoresError(f"voc2007: {expected} not found; point --data-root at the folder holding VOCdevkit/")
    try:
        voc = VOCDetection(root, year="2007", image_set=split, download=False)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        raise ActionScoresError(f"voc2007: cannot read split {split!r} under {expected}: {error}") from None

    def load(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        picture, annotation = voc[index]
        objects = annotation["annotation"].get("object", [])
        objects = objects if isinstance(objects, list) else [objects]
        boxes = [[float(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
        labels = [VOC_CLASSES.index(o["name"]) + 1 for o in objects]
        return (np.asarray(picture.convert("RGB")), np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64))

    return DetectionDataset(len(voc), load)


@dataclass(frozen=True)
class DetectionSplit:
    """A detection split and the names of its 1-based labels (`class_names[0]` = "background")."""

    dataset: DetectionDataset
    class_names: list[str]


_DIGIT_NAMES = ["background"] + [str(d) for d in range(10)]
DETECTION_DATASETS = {
    "digit-scenes": lambda split, root: DetectionSplit(digit_scenes(split), _DIGIT_NAMES),
    "voc2007": lambda split, root: DetectionSplit(voc2007(split, root), ["background", *VOC_CLASSES]),
}


def load_detection_split(dataset: str, split: str, root: str | None = None) -> DetectionSplit:
    """A detection split by dataset name; an unknown name lists the valid ones."""
    if dataset not in DETECTION_DATASETS:
        raise ActionScoresError(f"unknown detection dataset {dataset!r}; choose one of {sorted(DETECTION_DATASETS)}")
    return DETECTION_DATASETS[dataset](split, root)


def detection_collate(items: list[dict]) -> dict:
    """Batch `IndexedDataset` items whose targets hold a variable number of boxes: lists, not stacks."""
    return {
        "sample_id": torch.tensor([item["sample_id"] for item in items], dtype=torch.int64),
        "input": [item["input"] for item in items],
        "target": [item["target"] for item in items],
    }


def record_detection_media(recorder: LossRecorder, sample_ids: np.ndarray, split: DetectionSplit) -> MediaSummary:
    """Record the images of `sample_ids` with their boxes and class names, with the split's recorder."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    scenes = [split.dataset.scene(int(i)) for i in ids]
    return recorder.record_media(ids, images=[image for image, _, _ in scenes], boxes=[boxes for _, boxes, _ in scenes],
                                 box_labels=[[split.class_names[int(label)] for label in labels]
                                             for _, _, labels in scenes])


def split_view(dataset: str, split: str, sample_ids: np.ndarray, data_root: str | None) -> SplitView:
    """The panels' view of a run recorded without media: the scenes rebuilt, their boxes drawn."""
    data = load_detection_split(dataset, split, data_root)
    return detection_view(sample_ids, data.dataset.scene, data.class_names, len(data.dataset), dataset, split)
