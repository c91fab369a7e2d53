"""What a panel shows of each sample, recorded once per split so the job never needs the data.

    record_media(tracker, "test", ids, labels=names, images=pixels)   # or texts=..., or uris=...

writes `per_sample_media/<split>/media.parquet` (columns in `tracking.contract`) and hands it
to the run. The post-hoc job draws its panels from this table, on any machine that reaches
the tracking server, even after the training data is gone.

- `images`: uint8 pixels, HxW (grey) or HxWx3 (RGB), channels last, as an NxHxW[x3] array or
  a list of arrays of any sizes. Floats are refused rather than guessed at (is it [0, 1] or
  [0, 255]?): convert with `(x * 255).round().astype(np.uint8)`. Pictures up to
  `THUMBNAIL_SIDE` pixels a side are stored as they are (lossless PNG by PIL; same-size ones
  up to `STORED_PICTURE_BYTES` uncompressed, all at once, by `tracking.record.png`: the
  table's zstd does better across pictures); larger ones as a PNG thumbnail of that size.
- `texts`: strings, stored up to `MAX_TEXT_CHARS` characters.
- `boxes` (with `images`, for detection): each image's ground-truth boxes, an (n, 4) array of
  x1y1x2y2 in its pixels, with `box_labels` (n names each) if given; stored scaled to the stored
  picture (`contract.BOXES`), so the panels draw them on the thumbnail.
- `uris`: paths or URLs, for data too large to copy. Given beside `images` or `texts` they
  are stored too, and are what is kept when the media would exceed `max_bytes`.

Above `max_bytes` of encoded media the table holds the URIs if given, else nothing is
written; either way a warning says so and `MediaSummary.reason` says why.
The job reads the table back in `tracking.report.views`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.files import THUMBNAIL_SIDE, encode_png, remove_with, temporary_folder, write_atomically
from tracking.record.ids import checked_sample_ids, host_array
from tracking.record.png import stored_pngs

if TYPE_CHECKING:
    from tracking.backends.base import RunWriter

DEFAULT_MAX_BYTES = 256 * 2**20  # encoded media per split; CIFAR-10's 50,000 training images take ~120 MB
STORED_PICTURE_BYTES = 1024  # pictures up to this many bytes (32x32 grey) go into their PNG uncompressed
MAX_TEXT_CHARS = 1000  # a panel card shows a few hundred; the table keeps this many

SCHEMA = pa.schema([
    (contract.SAMPLE_ID, pa.int64()),
    (contract.LABEL_NAME, pa.string()),
    (contract.MEDIA_KIND, pa.string()),
    (contract.IMAGE_PNG, pa.binary()),
    (contract.TEXT, pa.string()),
    (contract.URI, pa.string()),
])


@dataclass(frozen=True)
class MediaSummary:
    """What `record_media` recorded for a split: `kind` is "image", "text", "uri", or "none" with the
    `reason`; `bytes` is the size of the written table (0 when none)."""

    split: str
    kind: str
    rows: int
    bytes: int
    path: Path | None = None
    reason: str = ""

    @property
    def bytes_per_sample(self) -> float:
        """Table bytes per recorded sample (0 when nothing was written)."""
        return self.bytes / self.rows if self.rows else 0.0


def _checked_strings(name: str, values: Sequence[Any], size: int, hint: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise ActionScoresError(f"record_media: {name} must be a list of strings, one per sample id, "
                                f"got {type(values).__name__}")
    if len(values) != size:
        raise ActionScoresError(f"record_media: {len(values)} {name} for {size} sample ids; pass one per sample id")
    wrong = [i for i, value in enumerate(values) if not isinstance(value, str)]
    if wrong:
        raise ActionScoresError(
            f"record_media: {name} must be strings; positions {preview(wrong)} hold "
            f"{type(values[wrong[0]]).__name__} ({hint})"
        )
    return list(values)


def _checked_image(image: Any, position: int) -> np.ndarray:
    """A uint8 HxW or HxWx3 array; HxWx1 becomes HxW."""
    pixels = host_array(image)
    if pixels.dtype != np.uint8:
        fix = ("convert with (x * 255).round().astype(np.uint8)" if np.issubdtype(pixels.dtype, np.floating)
               else "convert to uint8 pixels in [0, 255]")
        raise ActionScoresError(f"record_media: image {position} has dtype {pixels.dtype}, expected uint8; {fix}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3) and pixels.shape[2] not in (1, 3):
        raise ActionScoresError(f"record_media: image {position} has shape {pixels.shape}, channels first; "
                                "pass channels last (HxWx3), e.g. image.transpose(1, 2, 0)")
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)) or 0 in pixels.shape:
        raise ActionScoresError(f"record_media: image {position} has shape {pixels.shape}; "
                                "expected HxW (grey) or HxWx3 (RGB) with both sides > 0")
    return pixels


def _split_images(images: Any, size: int) -> np.ndarray | list[np.ndarray]:
    """The checked pictures: an NxHxW[x3] stack, checked once for all, or a list of arrays, one by one."""
    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise ActionScoresError(f"record_media: images must be an NxHxW[x3] uint8 array or a list of arrays, "
                                f"got {type(images).__name__}")
    if len(images) != size:
        raise ActionScoresError(f"record_media: {len(images)} images for {size} sample ids; pass one per sample id")
    if hasattr(images, "shape") and len(images.shape) >= 3:  # one array: every picture has the first one's form
        stack = host_array(images)
        first = _checked_image(stack[0], 0)
        return stack.reshape(size, *first.shape)
    return [_checked_image(image, position) for position, image in enumerate(images)]


BOX_TYPE = pa.list_(pa.struct([*((corner, pa.float32()) for corner in contract.BOX_CORNERS),
                               (contract.BOX_LABEL, pa.string())]))


def _checked_boxes(boxes: Any, box_labels: Any, size: int) -> list[tuple[np.ndarray, list[str | None]]]:
    """Each sample's (n, 4) float boxes, x1 < x2 and y1 < y2, with its n names (None when not given)."""
    if isinstance(boxes, (str, bytes)) or not hasattr(boxes, "__len__") or len(boxes) != size:
        raise ActionScoresError(f"record_media: boxes must be a list of {size} arrays, one (n, 4) x1y1x2y2 "
                                "array per sample id")
    if box_labels is not None and (isinstance(box_labels, (str, bytes)) or not hasattr(box_labels, "__len__")
                                   or len(box_labels) != size):
        raise ActionScoresError(f"record_media: box_labels must be a list of {size} lists, the names of each "
                                "sample's boxes")
    checked = []
    for position, drawn in enumerate(boxes):
        corners = host_array(drawn).astype(np.float64)
        if corners.size == 0:
            corners = corners.reshape(0, 4)
        if corners.ndim != 2 or corners.shape[1] != 4 or not np.isfinite(corners).all() \
                or (corners[:, 2] <= corners[:, 0]).any() or (corners[:, 3] <= corners[:, 1]).any():
            raise ActionScoresError(f"record_media: boxes {position} must be an (n, 4) array of finite x1y1x2y2 "
                                    f"with x1 < x2 and y1 < y2, got {preview(corners.tolist())}")
        names = [None] * len(corners) if box_labels is None else list(box_labels[position])
        if len(names) != len(corners) or not all(isinstance(name, str) for name in names if name is not None):
            raise ActionScoresError(f"record_media: box_labels {position} must hold {len(corners)} strings, "
                                    f"one per box, got {preview(names)}")
        checked.append((corners, names))
    return checked


def _scaled_boxes(checked: list[tuple[np.ndarray, list[str | None]]], pictures: np.ndarray | list[np.ndarray],
                  pngs: list[bytes]) -> list[list[dict]]:
    """The boxes in the pixels of the stored pictures: thumbnails scale them as they scaled the image."""
    from PIL import Image

    rows = []
    for (corners, names), pixels, png in zip(checked, pictures, pngs):
        height, width = pixels.shape[:2]
        if max(height, width) > THUMBNAIL_SIDE:
            with Image.open(io.BytesIO(png)) as stored:
                corners = corners * np.tile([stored.width / width, stored.height / height], 2)
        rows.append([{**dict(zip(contract.BOX_CORNERS, map(float, box))), contract.BOX_LABEL: name}
                     for box, name in zip(corners, names)])
    return rows


def _encode_all(pictures: np.ndarray | list[np.ndarray]) -> list[bytes]:
    """PNGs of the checked pictures: same-size tiny ones stored all at once (`tracking.record.png`), others by PIL."""
    shapes = {pictures.shape[1:]} if isinstance(pictures, np.ndarray) else {picture.shape for picture in pictures}
    if len(shapes) == 1 and (max((shape := next(iter(shapes)))[:2]) <= THUMBNAIL_SIDE
                             and int(np.prod(shape)) <= STORED_PICTURE_BYTES):
        return stored_pngs(np.asarray(pictures))
    return [encode_png(pixels) for pixels in pictures]


def _write(table: pa.Table, folder: Path) -> Path:
    """Write atomically, so a re-recorded split never uploads half a table."""
    return write_atomically(folder / contract.MEDIA_FILE, lambda partial: pq.write_table(
        table, partial, compression="zstd", use_dictionary=[contract.LABEL_NAME, contract.MEDIA_KIND],
        column_encoding={contract.SAMPLE_ID: "DELTA_BINARY_PACKED"}))


def record_media(writer: RunWriter | None, split: str, sample_ids: Any, *, labels: Sequence[str] | None = None,
                 images: np.ndarray | Sequence[np.ndarray] | None = None, texts: Sequence[str] | None = None,
                 uris: Sequence[str] | None = None, boxes: Sequence[Any] | None = None,
                 box_labels: Sequence[Sequence[str]] | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 local_dir: Path | None = None) -> MediaSummary:
    """Record what the panels of `split` show of each sample: a picture, a text or a URI, with its label name.

    Give `images` or `texts` (or neither), and `uris` alone or beside them as the fallback
    above `max_bytes`. Everything is checked before anything is written; the table goes to
    `local_dir` (default: the writer's spool folder, or without a writer a temporary folder, removed with the
    returned summary) and then to the run through `writer.log_artifact`. Returns what was recorded.
    """
    split = contract.check_name("split", split)
    if images is not None and texts is not None:
        raise ActionScoresError("record_media: got both images and texts; a split's media is one kind: pass one")
    if images is None and texts is None and uris is None:
        raise ActionScoresError("record_media: no media; pass images=, texts= or uris=")
    if (boxes is not None or box_labels is not None) and images is None:
        raise ActionScoresError("record_media: boxes belong to images; pass images= with boxes=")
    if box_labels is not None and boxes is None:
        raise ActionScoresError("record_media: box_labels without boxes; pass boxes= too")
    if max_bytes <= 0:
        raise ActionScoresError(f"record_media: max_bytes must be positive, got {max_bytes}")
    ids, _, _ = checked_sample_ids(sample_ids, "record_media", each_once=True)
    size = len(ids)
    label_names = (_checked_strings("labels", labels, size, "pass label names, e.g. [class_names[y] for y in targets]")
                   if labels is not None else [None] * size)
    uri_list = _checked_strings("uris", uris, size, "pass paths or URLs as strings") if uris is not None else None
    checked_boxes = _checked_boxes(boxes, box_labels, size) if boxes is not None else None
    pngs: list[bytes | None] = [None] * size
    text_list: list[str | None] = [None] * size
    box_rows: list[list[dict] | None] = [None] * size
    if images is not None:
        kind = "image"
        pictures = _split_images(images, size)
        pngs = _encode_all(pictures)
        if checked_boxes is not None:
            box_rows = _scaled_boxes(checked_boxes, pictures, pngs)
        payload = sum(len(png) for png in pngs)
    elif texts is not None:
        kind = "text"
        text_list = [text[:MAX_TEXT_CHARS] for text in _checked_strings("texts", texts, size, "pass the raw text")]
        payload = sum(len(text.encode()) for text in text_list)
    else:
        kind = "uri"
        payload = sum(len(uri.encode()) for uri in uri_list or [])
    reason = ""
    if payload > max_bytes:
        reason = f"{kind} media of split {split!r} take {payload:,} bytes, above max_bytes={max_bytes:,}"
        uri_bytes = sum(len(uri.encode()) for uri in uri_list) if uri_list is not None else None
        if kind != "uri" and uri_bytes is not None and uri_bytes <= max_bytes:
            reason += "; recorded the URIs instead"
            kind, pngs, text_list, box_rows = "uri", [None] * size, [None] * size, [None] * size
            warnings.warn(f"action-scores: {reason}", stacklevel=2)
        else:
            reason += "; recorded nothing: pass uris= (paths or URLs) to record those instead, or raise max_bytes"
            warnings.warn(f"action-scores: {reason}", stacklevel=2)
            return MediaSummary(split, "none", 0, 0, reason=reason)
    order = np.argsort(ids, kind="stable")
    columns = {
        contract.SAMPLE_ID: pa.array(ids[order], pa.int64()),
        contract.LABEL_NAME: pa.array([label_names[i] for i in order], pa.string()),
        contract.MEDIA_KIND: pa.array([kind] * size, pa.string()),
        contract.IMAGE_PNG: pa.array([pngs[i] for i in order], pa.binary()),
        contract.TEXT: pa.array([text_list[i] for i in order], pa.string()),
        contract.URI: pa.array([uri_list[i] for i in order] if uri_list is not None else [None] * size, pa.string()),
    }
    schema = SCHEMA
    if checked_boxes is not None and kind == "image":  # the optional column: only where boxes were given
        columns[contract.BOXES] = pa.array([box_rows[i] for i in order], BOX_TYPE)
        schema = SCHEMA.append(pa.field(contract.BOXES, BOX_TYPE))
    table = pa.table(columns, schema=schema)
    temporary = local_dir is None and writer is None
    if local_dir is None:
        local_dir = writer.spool_dir if writer is not None else temporary_folder()
    path = _write(table, Path(local_dir) / contract.media_dir(split))
    if writer is not None:
        writer.log_artifact(path, contract.media_dir(split))
    summary = MediaSummary(split, kind, size, path.stat().st_size, path, reason)
    if temporary:
        remove_with(summary, Path(local_dir))
    return summary
