"""How to show a split's samples in panels: a picture per sample id, a caption, a grouping.

A view is chosen by the run's task (`action_scores.task`): classification images
captioned with their class, or detection scenes with their boxes drawn. The built-in
datasets are rebuilt from `experiments` by the name the run recorded, imported only then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from tracking import contract
from tracking.errors import ActionScoresError, preview

if TYPE_CHECKING:
    from experiments.datasets import SplitData


def _check_ids_fit(scores: pd.DataFrame, size: int, dataset: str, split: str) -> None:
    """Refuse tables whose ids do not exist in the rebuilt data (the data changed or moved)."""
    ids = scores[contract.SAMPLE_ID]
    outside = ids[(ids < 0) | (ids >= size)]
    if len(outside):
        raise ActionScoresError(
            f"split {split!r}: the {dataset!r} data found has {size} samples but the tables have "
            f"sample ids {preview(outside)}; has the data changed? Point --data-root at the data the run used"
        )


@dataclass
class SplitView:
    """How to show a split's samples: their pictures, a caption line, an optional grouping column,
    and the split's size (named in panel titles when the scores cover only part of it)."""

    picture: Callable[[int], np.ndarray]
    label: Callable[[pd.Series], str]
    groups: str | None = None
    size: int | None = None


def classification_view(scores: pd.DataFrame, split_data: SplitData, dataset: str, split: str) -> SplitView:
    """Images captioned with their true label name, grouped by class.

    Adds `label` (from the data when the tables lack it) and `label_name` to `scores`;
    refuses ids or labels that the data does not have.
    """
    _check_ids_fit(scores, len(split_data.labels), dataset, split)
    if "label" not in scores:
        scores["label"] = split_data.labels[scores[contract.SAMPLE_ID].to_numpy()]
    labels = scores["label"].to_numpy()
    unknown = labels[(labels < 0) | (labels >= len(split_data.class_names))]
    if len(unknown):
        raise ActionScoresError(
            f"split {split!r}: labels {preview(np.unique(unknown))} have no class name (the {dataset!r} data has "
            f"{len(split_data.class_names)} classes): are these tables from another dataset?"
        )
    scores["label_name"] = [split_data.class_names[int(label)] for label in labels]
    return SplitView(split_data.image, lambda row: str(row["label_name"]), groups="label_name",
                     size=len(split_data.labels))


def _classification_view(scores: pd.DataFrame, dataset: str, split: str, data_root: str | None) -> SplitView:
    from experiments.datasets import load_split

    return classification_view(scores, load_split(dataset, split, data_root), dataset, split)


def _detection_view(scores: pd.DataFrame, dataset: str, split: str, data_root: str | None) -> SplitView:
    """Images with their ground-truth boxes drawn; adds `num_objects` and `median_box_size`
    (median sqrt(box area) / sqrt(image area)) to `scores`."""
    from experiments.detection_data import load_detection_split
    from tracking.report.panels import draw_boxes

    split_data = load_detection_split(dataset, split, data_root)
    _check_ids_fit(scores, len(split_data.dataset), dataset, split)
    counts, sizes = [], []
    for sample_id in tqdm(scores[contract.SAMPLE_ID], desc=f"boxes {split}", unit="image"):
        image, boxes, _ = split_data.dataset.scene(int(sample_id))
        side = (image.shape[0] * image.shape[1]) ** 0.5
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        counts.append(len(boxes))
        sizes.append(float(np.median(np.sqrt(areas)) / side) if len(boxes) else float("nan"))
    scores["num_objects"] = np.asarray(counts, dtype=np.int64)
    scores["median_box_size"] = sizes

    def picture(sample_id: int) -> np.ndarray:
        image, boxes, labels = split_data.dataset.scene(sample_id)
        return draw_boxes(image, boxes, [split_data.class_names[int(label)] for label in labels])

    def objects(row: pd.Series) -> str:
        count = int(row["num_objects"])
        return f"{count} object" + ("" if count == 1 else "s")

    return SplitView(picture, objects, size=len(split_data.dataset))


VIEWS: dict[str, Callable[[pd.DataFrame, str, str, str | None], SplitView]] = {
    "classification": _classification_view,
    "detection": _detection_view,
}
