"""Pictures of samples for the views: boxes drawn on a scene, text cards, local image files, and the
one font every picture and panel is lettered with (matplotlib's bundled DejaVu Sans, loaded once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    from PIL.ImageFont import FreeTypeFont

MIN_SIDE = 96  # small images are upscaled (nearest neighbour) to at least this many pixels
CARD_SIZE = (280, 170)  # pixels (width, height) of a text card: two a line, shown unscaled
CARD_FONT_PIXELS = 13  # ~40 characters x 9 lines: a ~350-character snippet
BOX_COLOUR = (255, 40, 40)


@lru_cache(maxsize=None)
def font(pixels: int, bold: bool = False) -> FreeTypeFont:
    """DejaVu Sans at `pixels`, from matplotlib's data folder: the same letters on every machine. The folder
    is found without importing matplotlib (0.4 CPU s), so a job drawing only with PIL never loads it."""
    import importlib.util

    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        raise ActionScoresError("no DejaVu Sans to letter the pictures with: matplotlib, whose data folder holds it, "
                                "is not installed; install the project's dependencies (pip install -e .)")
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / name), pixels)


def upscale_factor(image: np.ndarray, min_side: int = MIN_SIDE) -> int:
    """The integer factor that brings the image's shorter side to at least `min_side`."""
    return max(1, -(-min_side // min(image.shape[:2])))


def upscale(image: np.ndarray, min_side: int = MIN_SIDE) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor, so that 8x8 digits stay crisp and readable."""
    factor = upscale_factor(image, min_side)
    return image.repeat(factor, axis=0).repeat(factor, axis=1)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, names: Sequence[str], min_side: int = 256) -> np.ndarray:
    """The image (upscaled if small) with its ground-truth boxes and class names drawn on it."""
    from PIL import Image, ImageDraw

    factor = upscale_factor(image, min_side)
    picture = Image.fromarray(upscale(image, min_side) if factor > 1 else image).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for (x1, y1, x2, y2), name in zip(np.asarray(boxes, np.float64).reshape(-1, 4) * factor, names):
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=2)
        draw.text((x1 + 3, y1 + 1), name, fill=(255, 255, 0), font=font(11))
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
    from PIL import Image, ImageDraw

    letters = font(font_pixels)
    width, height = size
    margin, line_height = 6, round(font_pixels * 1.3)
    lines = wrap_to_width(text, lambda line: letters.getlength(line) <= width - 2 * margin)
    fit = max(1, (height - 2 * margin) // line_height)
    if len(lines) > fit:
        lines = lines[:fit]
        while lines[-1] and letters.getlength(lines[-1] + "…") > width - 2 * margin:
            lines[-1] = lines[-1][:-1]
        lines[-1] = lines[-1].rstrip() + "…"
    card = Image.new("RGB", size, (250, 250, 245))
    draw = ImageDraw.Draw(card)
    for number, line in enumerate(lines):
        draw.text((margin, margin + number * line_height), line, font=letters, fill=(20, 20, 20))
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
