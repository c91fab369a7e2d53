"""File writing shared by the recorder and the report, with no torch import: the one atomic file write (readers
see the old file or the new one, never half of one), the one temporary folder, and the one PNG thumbnail encoder."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # an annotation only: writing a table needs no numpy import
    import numpy as np

THUMBNAIL_SIDE = 64  # pixels: pictures with a longer side are stored as a thumbnail of this side


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(partial)` makes the file at a partial path beside `path`, which is then renamed over `path`
    (`os.replace`: atomic on one file system). A `write` that raises leaves `path` as it was and no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def temporary_folder() -> Path:
    """A new temporary folder (`<temp>/action-scores-*`), for files of no tracker's run; see `remove_with`."""
    return Path(tempfile.mkdtemp(prefix="action-scores-"))


def remove_with(owner: object, folder: Path) -> Path:
    """`folder`, removed with everything in it once `owner` (through which its files are read) is
    garbage-collected, or at the end of the process: a temporary folder never outlives its use."""
    weakref.finalize(owner, shutil.rmtree, folder, ignore_errors=True)
    return folder


def encode_png(pixels: np.ndarray, side: int = THUMBNAIL_SIDE) -> bytes:
    """PNG of the pixels as they are when both sides are <= `side`, else of a thumbnail that fits `side`."""
    from PIL import Image

    picture = Image.fromarray(pixels)
    if max(pixels.shape[:2]) > side:
        picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
