"""How to show a split's samples in panels: a picture per sample id, a caption, a grouping.

The job takes the first view it can build, in this order (`choose_view`):
1. `media_view`: the media the run recorded (`per_sample_media/<split>/media.parquet`,
   `tracking.record.media`): pictures, text cards or URIs, needing no data at all;
2. the built-in datasets, rebuilt from `experiments` by the name the run recorded
   (`action_scores.dataset`) and chosen by its task (`action_scores.task`):
   classification images captioned with their class, or detection scenes with their boxes;
3. `function_view`: a picture function the user names (`--pictures module:function`);
4. none: scores only, and the reason.
"""

from __future__ import annotations

import importlib
import io
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    text: Callable[[int], str] | None = None  # a sample's text, for the table beside text panels
    source: str = ""  # where the pictures come from, for the job's message


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


def read_media(path: Path, split: str) -> pd.DataFrame:
    """A split's media table, checked against the contract, indexed by sample id."""
    media = pd.read_parquet(path)
    needed = [contract.SAMPLE_ID, contract.MEDIA_KIND, contract.LABEL_NAME, contract.IMAGE_PNG, contract.TEXT,
              contract.URI]
    if missing := [column for column in needed if column not in media]:
        raise ActionScoresError(
            f"split {split!r}: {contract.media_dir(split)}/{contract.MEDIA_FILE} lacks the columns {missing}; "
            "write it with tracking.record.record_media"
        )
    if media[contract.SAMPLE_ID].duplicated().any():
        repeated = media[contract.SAMPLE_ID][media[contract.SAMPLE_ID].duplicated()].unique()
        raise ActionScoresError(f"split {split!r}: the media table repeats sample ids {preview(repeated)}")
    kinds = set(media[contract.MEDIA_KIND].unique()) - set(contract.MEDIA_KINDS)
    if kinds:
        raise ActionScoresError(f"split {split!r}: unknown media kinds {sorted(kinds)}; known: "
                                f"{list(contract.MEDIA_KINDS)}")
    return media.set_index(contract.SAMPLE_ID)


def decode_png(data: bytes) -> np.ndarray:
    """The uint8 pixels (HxW or HxWx3) of a PNG from the media table."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return np.asarray(picture if picture.mode in ("L", "RGB") else picture.convert("RGB"))


def media_view(scores: pd.DataFrame, media: pd.DataFrame) -> SplitView:
    """Panels from the media the run recorded: pictures as they are, texts as cards, URIs as the
    picture they point to when it is a readable local image file, else as a card of the URI.

    Adds `label_name` to `scores` when the media name labels, and groups panels by it; a
    sample without media gets a card that says so.
    """
    from tracking.report.panels import local_picture, text_card

    def picture(sample_id: int) -> np.ndarray:
        if sample_id not in media.index:
            return text_card(f"sample {sample_id}: no media recorded")
        row = media.loc[sample_id]
        kind = row[contract.MEDIA_KIND]
        if kind == "image":
            return decode_png(row[contract.IMAGE_PNG])
        if kind == "text":
            return text_card(row[contract.TEXT])
        found = local_picture(row[contract.URI])
        return found if found is not None else text_card(row[contract.URI])

    def text(sample_id: int) -> str:
        if sample_id not in media.index:
            return ""
        row = media.loc[sample_id]
        return str(row[contract.TEXT] if row[contract.MEDIA_KIND] == "text" else row[contract.URI] or "")

    names = media[contract.LABEL_NAME]
    groups = None
    if names.notna().any():
        scores[contract.LABEL_NAME] = scores[contract.SAMPLE_ID].map(names).fillna("(no media)")
        groups = contract.LABEL_NAME
    kinds = set(media[contract.MEDIA_KIND])
    return SplitView(picture, _label(scores, groups), groups=groups,
                     text=text if kinds & {"text", "uri"} else None,
                     source=f"recorded media ({', '.join(sorted(kinds))})")


def _label(scores: pd.DataFrame, groups: str | None) -> Callable[[pd.Series], str]:
    """Captions: the label name when known, else the recorded target class, else nothing."""
    if groups is not None:
        return lambda row: str(row[groups])
    if contract.TARGET in scores:
        return lambda row: f"class {int(row[contract.TARGET])}"
    return lambda row: ""


def load_picture_function(spec: str) -> Callable[[int], np.ndarray]:
    """The function `module:function` names (the module imported from the current folder or
    the Python path), for `--pictures`; bad names are an error that says what to give."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ActionScoresError(f"--pictures {spec!r}: give module:function, e.g. mydata:picture "
                                "(a function of a sample id that returns a uint8 image)")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ActionScoresError(f"--pictures {spec!r}: cannot import {module_name!r} ({error}); run from its "
                                "folder or add that folder to PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    function = getattr(module, function_name, None)
    if not callable(function):
        found = sorted(name for name in dir(module) if not name.startswith("_") and callable(getattr(module, name)))
        raise ActionScoresError(f"--pictures {spec!r}: {module_name!r} has no function {function_name!r}; "
                                f"its functions: {found}")
    return function


def function_view(scores: pd.DataFrame, function: Callable[[int], object], name: str) -> SplitView:
    """Pictures from a user's function of a sample id; what it returns is checked to be a uint8 image."""

    def picture(sample_id: int) -> np.ndarray:
        image = np.asarray(function(sample_id))
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise ActionScoresError(
                f"--pictures {name}: returned {image.dtype} {image.shape} for sample {sample_id}; "
                "return a uint8 array, HxW (grey) or HxWx3 (RGB)"
            )
        return image

    return SplitView(picture, _label(scores, None), source=f"--pictures {name}")


def choose_view(scores: pd.DataFrame, split: str, *, media: Path | None, task: str, dataset: str | None,
                data_root: str | None, pictures: tuple[str, Callable[[int], object]] | None
                ) -> tuple[SplitView | None, str]:
    """The first view that can be built (see the module docstring), or None and the reason."""
    if media is not None:
        return media_view(scores, read_media(media, split)), ""
    if dataset:
        view = VIEWS[task](scores, dataset, split, data_root)
        view.source = view.source or f"the {dataset!r} data"
        return view, ""
    if pictures is not None:
        return function_view(scores, pictures[1], pictures[0]), ""
    return None, (f"no panels for split {split!r}: the run records no media ({contract.media_dir(split)}/"
                  f"{contract.MEDIA_FILE}) and no {contract.DATASET_PARAM!r} param, and no --pictures was given; "
                  "record media with LossRecorder.record_media, or pass --pictures module:function")
