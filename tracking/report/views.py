"""How to show a split's samples in panels: a picture per sample id, a caption, a grouping.

The job takes the first view it can build, in this order (`choose_view`):
1. `media_view`: the media the run recorded (`per_sample_media/<split>/media.parquet`,
   `tracking.record.media`): pictures (with their boxes, for detection), text cards or URIs,
   needing no data at all; the project's own training scripts record theirs;
2. a view registered for the dataset the run names (`action_scores.dataset`): an entry point of
   the group `action_scores.views` whose name is the dataset's and whose value is a function
   `(dataset, split, sample_ids, data_root) -> SplitView` (the built-in datasets register theirs, for runs
   recorded before media existed); `classification_view` and `detection_view` build one;
3. `function_view`: a picture function the user names (`--pictures module:function`);
4. none: scores only, and the reason.

A view never changes the scores table: what its captions and groups need (label names, object
counts) it carries in `SplitView.columns`, joined onto a copy by `SplitView.frame`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.files import THUMBNAIL_SIDE
from tracking.report.pictures import draw_boxes, local_picture, text_card

VIEW_GROUP = "action_scores.views"  # entry points: dataset name -> (dataset, split, sample_ids, data_root) -> SplitView
TASKS = ("classification", "detection")  # the values of the run param action_scores.task
NUM_OBJECTS = "num_objects"  # view columns of detection views: boxes per image,
MEDIAN_BOX_SIZE = "median_box_size"  # and the median sqrt(box area) / sqrt(image area)


@dataclass
class SplitView:
    """How to show a split's samples: their pictures, a caption line, an optional grouping column,
    and the split's size (named in panel titles when the scores cover only part of it).

    `columns` (indexed by sample id) holds what the captions and groups read besides the scores;
    `label` and `groups` read rows of `frame(scores)`."""

    picture: Callable[[int], np.ndarray]
    label: Callable[[pd.Series], str]
    groups: str | None = None
    size: int | None = None
    text: Callable[[int], str] | None = None  # a sample's text, for the table beside text panels
    source: str = ""  # where the pictures come from, for the job's message
    columns: pd.DataFrame | None = None
    # A sample's recorded thumbnail as it is (PNG bytes), for the browse page to embed rather than decode and
    # encode `picture` again; None for a sample without one (its picture is then encoded).
    thumbnail: Callable[[int], bytes | None] | None = None

    def frame(self, scores: pd.DataFrame) -> pd.DataFrame:
        """A new frame: the scores with this view's columns beside them, to rank by group and caption from.
        The scores themselves, which the job saves, stay as they are."""
        if self.columns is None:
            return scores
        return scores.join(self.columns, on=contract.SAMPLE_ID)


def check_ids_fit(sample_ids: np.ndarray, size: int, dataset: str, split: str) -> None:
    """Refuse ids that do not exist in the rebuilt data (the data changed or moved)."""
    ids = np.asarray(sample_ids)
    outside = ids[(ids < 0) | (ids >= size)]
    if len(outside):
        raise ActionScoresError(
            f"split {split!r}: the {dataset!r} data found has {size} samples but the tables have "
            f"sample ids {preview(outside)}; has the data changed? Point --data-root at the data the run used"
        )


def classification_view(sample_ids: np.ndarray, picture: Callable[[int], np.ndarray], labels: np.ndarray,
                        class_names: Sequence[str], dataset: str, split: str) -> SplitView:
    """Images captioned with their true label name, grouped by class; `labels` is the data's label of every
    sample id. Refuses ids or labels that the data does not have."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    check_ids_fit(ids, len(labels), dataset, split)
    shown = np.asarray(labels)[ids]
    unknown = shown[(shown < 0) | (shown >= len(class_names))]
    if len(unknown):
        raise ActionScoresError(
            f"split {split!r}: labels {preview(np.unique(unknown))} have no class name (the {dataset!r} data has "
            f"{len(class_names)} classes): are these tables from another dataset?"
        )
    columns = pd.DataFrame({contract.LABEL_NAME: [class_names[int(label)] for label in shown]},
                           index=pd.Index(ids, name=contract.SAMPLE_ID))
    return SplitView(lambda sample_id: picture(int(sample_id)), _label(contract.LABEL_NAME),
                     groups=contract.LABEL_NAME, size=len(labels), columns=columns)


def box_columns(sample_ids: np.ndarray, sides: Sequence[tuple[int, int]], boxes: Sequence[np.ndarray]
                ) -> pd.DataFrame:
    """`num_objects` and `median_box_size` (median sqrt(box area) / sqrt(image area), NaN without boxes) of
    each sample, from its image's (height, width) and its x1y1x2y2 boxes, indexed by sample id."""
    sizes = []
    for (height, width), drawn in zip(sides, boxes):
        drawn = np.asarray(drawn, np.float64).reshape(-1, 4)
        areas = (drawn[:, 2] - drawn[:, 0]) * (drawn[:, 3] - drawn[:, 1])
        sizes.append(float(np.median(np.sqrt(areas)) / (height * width) ** 0.5) if len(drawn) else float("nan"))
    return pd.DataFrame({NUM_OBJECTS: np.asarray([len(np.reshape(b, (-1, 4))) for b in boxes], np.int64),
                         MEDIAN_BOX_SIZE: sizes}, index=pd.Index(np.asarray(sample_ids, np.int64),
                                                                 name=contract.SAMPLE_ID))


def detection_view(sample_ids: np.ndarray, scene: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
                   class_names: Sequence[str], size: int, dataset: str, split: str) -> SplitView:
    """Images with their ground-truth boxes drawn, captioned with their number of objects; `scene(i)` is
    (uint8 image, x1y1x2y2 boxes, label indices into `class_names`)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    check_ids_fit(ids, size, dataset, split)
    scenes = [scene(int(i)) for i in ids]
    columns = box_columns(ids, [image.shape[:2] for image, _, _ in scenes], [boxes for _, boxes, _ in scenes])

    def picture(sample_id: int) -> np.ndarray:
        image, boxes, labels = scene(int(sample_id))
        return draw_boxes(image, boxes, [class_names[int(label)] for label in labels])

    return SplitView(picture, _objects, size=size, columns=columns)


def _objects(row: pd.Series) -> str:
    """`3 objects`, `1 object`: the caption of a detection picture."""
    count = int(row[NUM_OBJECTS])
    return f"{count} object" + ("" if count == 1 else "s")


def registered_view(dataset: str) -> Callable[[str, str, np.ndarray, str | None], SplitView] | None:
    """The view an installed package registers for `dataset` (entry point group `action_scores.views`), or None."""
    found = list(importlib.metadata.entry_points(group=VIEW_GROUP, name=dataset))
    return found[0].load() if found else None


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


def _png_sides(data: bytes) -> tuple[int, int]:
    """(height, width) of a PNG from its header, without decoding its pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return picture.height, picture.width


def browse_thumbnail(data: bytes) -> bool:
    """Whether a recorded PNG shows in the browse page as it is: 8-bit grey or RGB (what `decode_png` returns
    unconverted) and no side over `THUMBNAIL_SIDE` (what `encode_png` would keep unscaled), read from its IHDR."""
    if len(data) < 29 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return data[24] == 8 and data[25] in (0, 2) and max(width, height) <= THUMBNAIL_SIDE


def media_view(scores: pd.DataFrame, media: pd.DataFrame) -> SplitView:
    """Panels from the media the run recorded: pictures as they are (their boxes drawn, when recorded),
    texts as cards, URIs as the picture they point to when it is a readable local image file, else as a
    card of the URI.

    Groups panels by label name when the media name labels; a sample without media gets a card that
    says so. Pictures with boxes are captioned with their number of objects."""
    with_boxes = contract.BOXES in media and media[contract.BOXES].notna().any()
    # Plain dicts by sample id: a lookup is ~0.1 us, a `media.loc` row ~100 us (the browse page looks up every sample).
    kind_of, png_of, text_of_row, uri_of = (dict(zip(media.index.tolist(), media[column].tolist())) for column in
                                            (contract.MEDIA_KIND, contract.IMAGE_PNG, contract.TEXT, contract.URI))
    boxes_of = dict(zip(media.index.tolist(), media[contract.BOXES].tolist())) if with_boxes else {}

    def picture(sample_id: int) -> np.ndarray:
        kind = kind_of.get(sample_id)
        if kind is None:
            return text_card(f"sample {sample_id}: no media recorded")
        if kind == "image":
            image = decode_png(png_of[sample_id])
            if not with_boxes:
                return image
            recorded = boxes_of[sample_id]
            return draw_boxes(image, _boxes(recorded), [box[contract.BOX_LABEL] or "" for box in recorded]
                              if recorded is not None else [])
        if kind == "text":
            return text_card(text_of_row[sample_id])
        found = local_picture(uri_of[sample_id])
        return found if found is not None else text_card(uri_of[sample_id])

    def text(sample_id: int) -> str:
        kind = kind_of.get(sample_id)
        if kind is None:
            return ""
        return str(text_of_row[sample_id] if kind == "text" else uri_of[sample_id] or "")

    def thumbnail(sample_id: int) -> bytes | None:
        png = png_of.get(sample_id) if kind_of.get(sample_id) == "image" else None
        return png if png is not None and browse_thumbnail(png) else None

    ids = scores[contract.SAMPLE_ID].to_numpy()
    kinds = set(media[contract.MEDIA_KIND])
    source = f"recorded media ({', '.join(sorted(kinds))}{', boxes' if with_boxes else ''})"
    text_of = text if kinds & {"text", "uri"} else None
    if with_boxes:
        known = media.reindex(ids)
        sides = [_png_sides(png) if isinstance(png, bytes) else (1, 1) for png in known[contract.IMAGE_PNG]]
        columns = box_columns(ids, sides, [_boxes(boxes) for boxes in known[contract.BOXES]])
        return SplitView(picture, _objects, text=text_of, source=source, columns=columns)
    names = media[contract.LABEL_NAME]
    if names.notna().any():
        columns = pd.DataFrame({contract.LABEL_NAME: pd.Series(ids).map(names).fillna("(no media)").to_numpy()},
                               index=pd.Index(ids, name=contract.SAMPLE_ID))
        return SplitView(picture, _label(contract.LABEL_NAME), groups=contract.LABEL_NAME, text=text_of,
                         source=source, columns=columns, thumbnail=thumbnail)
    return SplitView(picture, _label(None, scores), text=text_of, source=source, thumbnail=thumbnail)


def _boxes(recorded: object) -> np.ndarray:
    """The (n, 4) x1y1x2y2 boxes of a media row's `boxes` cell (none when null)."""
    if recorded is None or (isinstance(recorded, float) and np.isnan(recorded)):
        return np.zeros((0, 4))
    return np.asarray([[box[corner] for corner in contract.BOX_CORNERS] for box in recorded],
                      np.float64).reshape(-1, 4)


def _label(column: str | None, scores: pd.DataFrame | None = None) -> Callable[[pd.Series], str]:
    """Captions: the view's label column when it has one, else the recorded target class, else nothing."""
    if column is not None:
        return lambda row: str(row[column])
    if scores is not None and contract.TARGET in scores:
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

    return SplitView(picture, _label(None, scores), source=f"--pictures {name}")




def choose_view(scores: pd.DataFrame, split: str, *, media: Path | None, task: str, dataset: str | None,
                data_root: str | None, pictures: tuple[str, Callable[[int], object]] | None
                ) -> tuple[SplitView | None, str]:
    """The first view that can be built (see the module docstring), or None and the reason."""
    if media is not None:
        return media_view(scores, read_media(media, split)), ""
    registered = registered_view(dataset) if dataset else None
    if registered is not None:
        view = registered(dataset, split, scores[contract.SAMPLE_ID].to_numpy(), data_root)
        view.source = view.source or f"the {dataset!r} data"
        return view, ""
    if pictures is not None:
        return function_view(scores, pictures[1], pictures[0]), ""
    named = (f"no view registered for its {task} dataset {dataset!r} (entry point group {VIEW_GROUP!r})"
             if dataset else f"no {contract.DATASET_PARAM!r} param")
    return None, (f"no panels for split {split!r}: the run records no media ({contract.media_dir(split)}/"
                  f"{contract.MEDIA_FILE}), {named}, and no --pictures was given; "
                  "record media with LossRecorder.record_media, or pass --pictures module:function")
