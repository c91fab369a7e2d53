"""Picture panels like the paper's figures: rows of the hardest and easiest samples, captioned.

Render only: the rows come ranked (`tracking.scoring.rank.pick`, once, in the job). Each PNG carries the
ids it shows, in order, in a text chunk (`action_scores.rows`), so that a test or a
user can check a panel without reading pixels. Drawn with PIL: a panel is its thumbnails in a grid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tracking.contract import SAMPLE_ID
from tracking.errors import ActionScoresError
from tracking.report.pictures import font, upscale, upscale_factor, wrap_to_width
from tracking.scoring.rank import Picked

if TYPE_CHECKING:
    from PIL import Image
    from PIL.ImageFont import FreeTypeFont

ROWS_KEY = "action_scores.rows"
# MLflow 3.17's artifact pane is ~680 px wide in a 1600x1000 window (beside the file tree and the
# assistant panel; bench/ui_screenshot.py): a panel no wider shows unscaled, its captions readable.
PANEL_PIXELS = 650
MIN_PANEL_PIXELS = 360  # room for the title of a panel of one or two small tiles
MAX_COLUMNS = 5  # 10 samples -> 2 rows of 5, as the paper's figures
TILE_PIXELS = (110, 260)  # a tile shows its picture at its pixel size, within these bounds
GAP = 8
CAPTION_PIXELS_FONT = 13  # ~10 pt at 100 dpi
LINE_PIXELS = 17
CAPTION_PIXELS = 2 * LINE_PIXELS + 6  # under each picture: its two caption lines
INK, FRAME = (20, 20, 20), (200, 200, 200)  # greys: a grey panel draws them as they are
# Kept for the plots drawn with matplotlib beside the panels (the data map): the same size and letters.
DPI = 100
PANEL_WIDTH = 5.8  # inches at DPI
CAPTION_POINTS = 10


@dataclass
class PanelItem:
    """One picture of a panel: the sample, its uint8 image (HxW or HxWx3) and its caption."""

    sample_id: int
    image: np.ndarray
    caption: str


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
    """(rows, columns) of a balanced grid for `count` tiles, at most `max_columns` wide: 10 -> 2 x 5, 7 -> 2 x 4."""
    rows = max(1, -(-count // max_columns))
    return rows, max(1, -(-count // rows))


def _fitted(image: np.ndarray, width: int, height: int, mode: str) -> Image.Image:
    """The picture in the canvas' `mode`, small ones upscaled (nearest neighbour), scaled down to fit a
    `width` x `height` tile."""
    from PIL import Image

    picture = Image.fromarray(upscale(image)).convert(mode)
    shrink = min(1.0, width / picture.width, height / picture.height)
    if shrink < 1.0:
        picture = picture.resize((max(1, round(picture.width * shrink)), max(1, round(picture.height * shrink))),
                                 Image.Resampling.BILINEAR)
    return picture


def _cut_to(line: str, width: int, letters: FreeTypeFont) -> str:
    """The line, cut with '…' where it is wider than `width` pixels."""
    if letters.getlength(line) <= width:
        return line
    while line and letters.getlength(line + "…") > width:
        line = line[:-1]
    return line + "…"


def render_panel(rows: Sequence[tuple[str, Sequence[PanelItem]]], path: Path, title: str) -> Path:
    """Draw each `(row_title, items)` as a grid of at most `MAX_COLUMNS` tiles a line, one under
    another, to a PNG with the shown ids, in order, in its metadata (`read_panel_rows`).

    Composed from the pictures directly (one PIL image, captions in DejaVu Sans): a few milliseconds
    a panel. A panel of grey pictures (HxW) is drawn and saved grey ("L"): every colour it uses is a grey,
    so its pixels are those of the RGB drawing, at a third of the bytes to filter and deflate. Sized for where people look: at most ~650 px wide, what MLflow's artifact pane shows
    unscaled in a 1600-px window, so the captions stay readable there. Tiles show pictures at about
    their pixel size (small ones upscaled), so large tiles (text cards, detection scenes) get fewer columns.
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    if not rows:
        raise ActionScoresError(f"panel {path}: no rows to draw; pass at least one (title, items) row")
    shapes = [tuple(side * upscale_factor(item.image) for side in item.image.shape[:2])
              for _, items in rows for item in items] or [(1, 1)]
    # At least two tiles a line: a scene 500 px wide would otherwise get a column of its own, a 10-scene
    # panel 3,200 px tall; wider pictures are scaled down into the tile, and the tile's height with them.
    widest = max(width for _, width in shapes)
    tile_width = int(np.clip(widest, TILE_PIXELS[0], PANEL_PIXELS // 2))
    tile_height = int(np.clip(max(height for height, _ in shapes) * min(1.0, tile_width / widest), *TILE_PIXELS))
    columns = max(1, min(MAX_COLUMNS, PANEL_PIXELS // (tile_width + GAP)))
    columns = max(grid_shape(len(items), columns)[1] for _, items in rows)  # balanced: 7 tiles -> 4 + 3
    cell_width, cell_height = tile_width + GAP, tile_height + CAPTION_PIXELS
    width = max(columns * cell_width + GAP, MIN_PANEL_PIXELS)
    caption, bold = font(CAPTION_PIXELS_FONT), font(CAPTION_PIXELS_FONT + 1, bold=True)
    title_lines = wrap_to_width(title, lambda line: bold.getlength(line) <= width - 2 * GAP)
    top = GAP + len(title_lines) * LINE_PIXELS + GAP
    height = top + sum(LINE_PIXELS + max(1, -(-len(items) // columns)) * cell_height for _, items in rows) + GAP
    mode = "L" if all(item.image.ndim == 2 for _, items in rows for item in items) else "RGB"
    ink, frame = (INK[0], FRAME[0]) if mode == "L" else (INK, FRAME)
    canvas = Image.new(mode, (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(title_lines):
        draw.text((width / 2, GAP + number * LINE_PIXELS), line, font=bold, fill=ink, anchor="ma")
    y = top
    for row_title, items in rows:
        draw.text((GAP, y), row_title, font=bold, fill=ink)
        y += LINE_PIXELS
        for position, item in enumerate(items):
            x0, y0 = GAP + (position % columns) * cell_width, y + (position // columns) * cell_height
            picture = _fitted(item.image, tile_width, tile_height, mode)
            left, upper = x0 + (tile_width - picture.width) // 2, y0 + (tile_height - picture.height) // 2
            canvas.paste(picture, (left, upper))
            draw.rectangle([left - 1, upper - 1, left + picture.width, upper + picture.height], outline=frame)
            for number, line in enumerate(item.caption.split("\n")):
                draw.text((x0 + tile_width / 2, y0 + tile_height + 3 + number * LINE_PIXELS),
                          _cut_to(line, cell_width - 2, caption), font=caption, fill=ink, anchor="ma")
        y += max(1, -(-len(items) // columns)) * cell_height
    path.parent.mkdir(parents=True, exist_ok=True)
    described = [{"title": t, "sample_ids": [int(i.sample_id) for i in items], "captions": [i.caption for i in items]}
                 for t, items in rows]
    info = PngInfo()
    info.add_text(ROWS_KEY, json.dumps(described))
    canvas.save(path, format="PNG", pnginfo=info, compress_level=6)
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
