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
# MLflow 3.17's artifact pane is ~680 px wide in a 1600x1000 window (beside the file tree and the
# assistant panel; bench/ui_screenshot.py): a panel no wider shows unscaled, its captions readable.
PANEL_WIDTH = 5.8  # inches of tiles at DPI, plus 0.7 for the row titles: ~650 px in all
MAX_COLUMNS = 5  # 10 samples -> 2 rows of 5, as the paper's figures
TILE_SIDES = (1.1, 2.6)  # inches: a tile shows its picture at its pixel size, within these bounds
CAPTION_HEIGHT = 0.55  # inches under each picture for its two caption lines
CAPTION_POINTS = 10
CARD_SIZE = (280, 170)  # pixels (width, height) of a text card: two a line, shown unscaled
CARD_FONT_PIXELS = 13  # ~40 characters x 9 lines: a ~350-character snippet


@dataclass
class PanelItem:
    """One picture of a panel: the sample, its uint8 image (HxW or HxWx3) and its caption."""

    sample_id: int
    image: np.ndarray
    caption: str


def upscale_factor(image: np.ndarray, min_side: int = MIN_SIDE) -> int:
    """The integer factor that brings the image's shorter side to at least `min_side`."""
    return max(1, -(-min_side // min(image.shape[:2])))


def upscale(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor, so that 8x8 digits stay crisp and readable."""
    factor = upscale_factor(image, min_side)
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) of a balanced grid for `count` tiles, at most `max_columns` wide: 10 -> 2 x 5, 7 -> 2 x 4."""
    rows = max(1, -(-count // max_columns))
    return rows, max(1, -(-count // rows))


def render_panel(rows: Sequence[tuple[str, Sequence[PanelItem]]], path: Path, title: str) -> Path:
    """Draw each `(row_title, items)` as a grid of at most `MAX_COLUMNS` tiles a line, one under
    another, to a PNG with the shown ids, in order, in its metadata (`read_panel_rows`).

    Sized for where people look: at most ~650 px wide, what MLflow's artifact pane shows
    unscaled in a 1600-px window, so the 10-pt captions stay readable there (a 10-tile strip
    was 1660 px wide and got shrunk to 40%). Tiles show pictures at about their pixel size
    (small ones upscaled), so large tiles (text cards, detection scenes) get fewer columns.
    Uses a bare Agg canvas rather than pyplot, so drawing never changes the caller's backend.
    """
    if not rows:
        raise ActionScoresError(f"panel {path}: no rows to draw; pass at least one (title, items) row")
    shapes = [tuple(side * upscale_factor(item.image) for side in item.image.shape[:2])
              for _, items in rows for item in items] or [(1, 1)]
    # At least two tiles a line: a scene 500 px wide would otherwise get a column of its own, a 10-scene
    # panel 3,200 px tall; wider pictures are scaled down into the tile, and the tile's height with them.
    widest = max(width for _, width in shapes) / DPI
    tile_width = float(np.clip(widest, TILE_SIDES[0], PANEL_WIDTH / 2))
    shrink = min(1.0, tile_width / widest)
    tile_height = float(np.clip(max(height for height, _ in shapes) / DPI * shrink, *TILE_SIDES))
    columns = max(1, min(MAX_COLUMNS, int(PANEL_WIDTH // tile_width)))
    columns = max(grid_shape(len(items), columns)[1] for _, items in rows)  # balanced: 7 tiles -> 4 + 3
    lines = sum(max(1, -(-len(items) // columns)) for _, items in rows)
    figure = agg_figure(tile_width * columns + 0.7, (tile_height + CAPTION_HEIGHT) * lines + 0.6)
    axes = figure.subplots(lines, columns, squeeze=False)
    line = 0
    for row_title, items in rows:
        grid_rows = max(1, -(-len(items) // columns))
        for position in range(grid_rows * columns):
            axis = axes[line + position // columns][position % columns]
            axis.set_xticks([])
            axis.set_yticks([])
            if position >= len(items):
                axis.axis("off")
                continue
            picture = upscale(items[position].image)
            axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255,
                        interpolation="nearest")
            axis.set_xlabel(items[position].caption, fontsize=CAPTION_POINTS)
        axes[line][0].axis("on")  # keep the row title visible even on an empty row
        axes[line][0].set_ylabel(row_title, fontsize=CAPTION_POINTS + 1, fontweight="bold")
        line += grid_rows
    figure.suptitle(title, fontsize=CAPTION_POINTS + 1)
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

    factor = upscale_factor(image, min_side)
    picture = Image.fromarray(upscale(image, min_side) if factor > 1 else image).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for (x1, y1, x2, y2), name in zip(boxes * factor, names):
        draw.rectangle([x1, y1, x2, y2], outline=(255, 40, 40), width=2)
        draw.text((x1 + 3, y1 + 1), name, fill=(255, 255, 0))
    return np.asarray(picture)


def wrap_to_width(text: str, fits: Callable[[str], bool]) -> list[str]:
    """Greedy word wrap: each line as many words as `fits` allows; a word too long for a line is cut."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        while not fits(word):  # a URL or a long token: cut it where it stops fitting
            cut = max(1, max(n for n in range(1, len(word) + 1) if n == 1 or fits(word[:n])))
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        if not word:
            continue
        if line and fits(f"{line} {word}"):
            line = f"{line} {word}"
        elif line:
            lines.append(line)
            line = word
        else:
            line = word
    return [*lines, line] if line else lines or [""]


def text_card(text: str, size: tuple[int, int] = CARD_SIZE, font_pixels: int = CARD_FONT_PIXELS) -> np.ndarray:
    """A uint8 RGB picture of `text`, word-wrapped to the card and cut with '…' where it does not fit,
    so that a text sample takes a tile of a panel like a picture does (its caption holds score and label).
    Square and about a tile's size in pixels, so the panel shows it unscaled."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), font_pixels)
    width, height = size
    margin, line_height = 6, round(font_pixels * 1.3)
    lines = wrap_to_width(text, lambda line: font.getlength(line) <= width - 2 * margin)
    fit = max(1, (height - 2 * margin) // line_height)
    if len(lines) > fit:
        lines = lines[:fit]
        while lines[-1] and font.getlength(lines[-1] + "…") > width - 2 * margin:
            lines[-1] = lines[-1][:-1]
        lines[-1] = lines[-1].rstrip() + "…"
    card = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(card)
    for number, line in enumerate(lines):
        draw.text((margin, margin + number * line_height), line, font=font, fill=(20, 20, 20))
    return np.asarray(card)


def local_picture(uri: str, side: int = 256) -> np.ndarray | None:
    """The uint8 pixels of a readable local image file (`/x.png` or `file:///x.png`), at most `side`
    pixels a side; None for anything else (a URL, a missing file, not an image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    try:
        if not path.is_file():
            return None
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((side, side))
            return np.asarray(picture)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
