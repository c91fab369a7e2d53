"""Picture panels like the paper's figures: rows of the hardest and easiest samples, captioned.

Render only: the rows come ranked (`tracking.scoring.rank.pick`, once, in the job). Each PNG carries the
ids it shows, in order, in a text chunk (`action_scores.rows`), so that a test or a
user can check a panel without reading pixels. matplotlib is imported when drawing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID
from tracking.errors import ActionScoresError
from tracking.report.plots import agg_figure
from tracking.scoring.rank import Picked

ROWS_KEY = "action_scores.rows"
MIN_SIDE = 96  # small images are upscaled (nearest neighbour) to at least this many pixels
DPI = 100


@dataclass
class PanelItem:
    """One picture of a panel: the sample, its uint8 image (HxW or HxWx3) and its caption."""

    sample_id: int
    image: np.ndarray
    caption: str


def upscale(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor, so that 8x8 digits stay crisp and readable."""
    factor = max(1, -(-min_side // min(image.shape[:2])))
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def render_panel(rows: Sequence[tuple[str, Sequence[PanelItem]]], path: Path, title: str) -> Path:
    """Draw a grid (one row per `(row_title, items)`) to a PNG with the shown ids in its metadata.

    Uses a bare Agg canvas rather than pyplot, so drawing never changes the caller's backend.
    """
    if not rows:
        raise ActionScoresError(f"panel {path}: no rows to draw; pass at least one (title, items) row")
    columns = max([1, *(len(items) for _, items in rows)])
    largest = max((max(item.image.shape[:2]) for _, items in rows for item in items), default=0)
    tile = 1.6 if largest <= MIN_SIDE else 2.6  # inches: detection scenes need room for box labels
    figure = agg_figure(tile * columns + 0.6, (tile + 0.45) * len(rows) + 0.5)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (row_title, items) in enumerate(rows):
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(items):
                axis.axis("off")
                continue
            picture = upscale(items[column].image)
            axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255,
                        interpolation="nearest")
            axis.set_xlabel(items[column].caption, fontsize=8)
        axes[row][0].axis("on")  # keep the row title visible even on an empty row
        axes[row][0].set_ylabel(row_title, fontsize=10, fontweight="bold")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    described = [{"title": t, "sample_ids": [int(i.sample_id) for i in items], "captions": [i.caption for i in items]}
                 for t, items in rows]
    figure.savefig(path, dpi=DPI, metadata={ROWS_KEY: json.dumps(described)})
    return path


def read_panel_rows(path: str | Path) -> list[dict]:
    """The rows a panel shows: `[{"title", "sample_ids", "captions"}, ...]`, from its PNG metadata."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {})
    if ROWS_KEY not in text:
        raise ActionScoresError(f"{path} has no {ROWS_KEY!r} text chunk: it was not written by render_panel")
    return json.loads(text[ROWS_KEY])


def safe_file_names(names: Iterable[str]) -> dict[str, str]:
    """A distinct file-system-safe stem for each name (`a/b` -> `a_b`; clashes get `-2`, `-3`...)."""
    stems: dict[str, str] = {}
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"
        candidate, count = stem, 1
        while candidate in stems.values():
            count += 1
            candidate = f"{stem}-{count}"
        stems[name] = candidate
    return stems


def panel_items(chosen: pd.DataFrame, column: str, picture: Callable[[int], np.ndarray],
                label: Callable[[pd.Series], str]) -> list[PanelItem]:
    """Captioned pictures of the chosen rows, in their order: `<column> <score>` over `label(row)`."""
    return [PanelItem(int(row[SAMPLE_ID]), picture(int(row[SAMPLE_ID])), f"{column} {row[column]:.3g}\n{label(row)}")
            for _, row in chosen.iterrows()]


def ranked_panels(picked: Picked, out_dir: Path, picture: Callable[[int], np.ndarray],
                  label: Callable[[pd.Series], str], *, split_size: int | None = None
                  ) -> tuple[list[Path], dict[str, list[PanelItem]]]:
    """`hardest.png` and `easiest.png` of the rows `picked` holds and, per group it holds, one
    two-row panel under `by_class/`. Captions: the score and `label(row)`; titles: the direction.

    Returns the PNGs and the items of the two overview panels (`"hardest"`, `"easiest"`), so
    that the job logs the very samples drawn. `split_size`, when the scores cover only part
    of a split, is named in the titles.
    """
    column = picked.column
    shown = f"{picked.samples}" if split_size in (None, picked.samples) else f"{picked.samples} of {split_size}"
    what = f"{column} over {shown} samples ({picked.direction})"
    items = {which: panel_items(rows, column, picture, label)
             for which, rows in (("hardest", picked.hardest), ("easiest", picked.easiest))}
    written = [render_panel([(which, items[which])], out_dir / f"{which}.png", f"{len(rows)} {which} by {what}")
               for which, rows in (("hardest", picked.hardest), ("easiest", picked.easiest))]
    stems = safe_file_names(str(name) for name in picked.by_group)
    for name, (hard, easy, size) in picked.by_group.items():
        rows = [("hardest", panel_items(hard, column, picture, label)),
                ("easiest", panel_items(easy, column, picture, label))]
        written.append(render_panel(rows, out_dir / "by_class" / f"{stems[str(name)]}.png",
                                    f"{name}: {column} over its {size} samples ({picked.direction})"))
    return written, items


def draw_boxes(image: np.ndarray, boxes: np.ndarray, names: Sequence[str], min_side: int = 256) -> np.ndarray:
    """The image (upscaled if small) with its ground-truth boxes and class names drawn on it."""
    from PIL import Image, ImageDraw

    factor = max(1, -(-min_side // min(image.shape[:2])))
    picture = Image.fromarray(upscale(image, min_side) if factor > 1 else image).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for (x1, y1, x2, y2), name in zip(boxes * factor, names):
        draw.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        draw.text((x1 + 3, y1 + 1), name, fill=(255, 255, 0))
    return np.asarray(picture)
