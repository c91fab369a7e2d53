"""Plots of whole score columns (not pictures of samples): per-class distributions, run-vs-run matrices,
the data map.

The per-class distribution is drawn with PIL, as the panels, so a job drawing panels and distributions
never imports matplotlib; the others on a bare Agg canvas, so plotting never changes the caller's backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tracking.errors import ActionScoresError
from tracking.report.panels import (CAPTION_PIXELS_FONT, CAPTION_POINTS, DPI, GAP, LINE_PIXELS, PANEL_WIDTH,
                                    _cut_to)
from tracking.report.pictures import font, wrap_to_width

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(width: float, height: float) -> Figure:
    """A figure of `width` x `height` inches on its own Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


BOXES_KEY = "action_scores.boxes"  # PNG text chunk of a class distribution: each box's numbers, as JSON
BOX_SIZE = (600, 450)  # pixels: the least width (ten digit classes get 800) and the height
BOX_SLOT, BOX_ROOM = 60, 200  # pixels of width a class, and beside the boxes (matplotlib's 0.6 + 2 inches)
BOX_MARGINS = (80, 15, 40, 62)  # left (values, axis label), right, top (title), bottom (two-line class labels)
# Drawn grey ("L": a third of the bytes to filter and deflate, as a grey panel), the grey 0 then painted
# matplotlib's median orange by the palette the PNG is saved with: the text's edges blend greys 20..255 only.
BOX_INK, BOX_GRID, BOX_MEDIAN = 20, 232, 0
BOX_MEDIAN_COLOUR = (255, 127, 14)
WHISKER_IQR = 1.5  # Tukey's whiskers, matplotlib's default: samples further out are drawn one by one


@dataclass(frozen=True)
class BoxStats:
    """One class's box: its quartiles, the whisker ends (the furthest samples within WHISKER_IQR box
    heights of the box) and the samples beyond them, as matplotlib's `boxplot` computes them."""

    name: str
    count: int
    q1: float
    median: float
    q3: float
    low: float
    high: float
    outliers: np.ndarray

    def described(self) -> dict:
        """The box's numbers, for the PNG's text chunk."""
        return {"name": self.name, "count": self.count, "q1": self.q1, "median": self.median, "q3": self.q3,
                "low": self.low, "high": self.high, "outliers": int(self.outliers.size)}


def box_stats(name: str, values: np.ndarray) -> BoxStats:
    """The box of `values` (non-finite ones left out; a class without any gets NaNs and is not drawn)."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return BoxStats(name, 0, *[float("nan")] * 5, np.empty(0))
    q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    reach = WHISKER_IQR * (q3 - q1)
    below, above = values[values <= q3 + reach], values[values >= q1 - reach]
    high = max(float(below.max()), q3) if below.size else q3
    low = min(float(above.min()), q1) if above.size else q1
    return BoxStats(name, int(values.size), q1, median, q3, low, high, values[(values < low) | (values > high)])


@dataclass(frozen=True)
class ValueRows:
    """Values to pixel rows of a plot: `lo` at row `bottom`, `hi` at row `top` (rows grow downwards)."""

    lo: float
    hi: float
    top: int
    bottom: int

    @classmethod
    def around(cls, boxes: Sequence[BoxStats], top: int, bottom: int) -> ValueRows:
        """The rows of every whisker and outlier, with 5% room above and below (as matplotlib's axes)."""
        drawn = [b for b in boxes if b.count]
        lo = min((float(np.min(np.r_[b.low, b.outliers])) for b in drawn), default=0.0)
        hi = max((float(np.max(np.r_[b.high, b.outliers])) for b in drawn), default=1.0)
        room = 0.05 * (hi - lo) or 0.5 * (abs(hi) or 1.0)
        return cls(lo - room, hi + room, top, bottom)

    def rows(self, values: np.ndarray | float) -> np.ndarray:
        """The (rounded) pixel row of each value."""
        fraction = (np.asarray(values, np.float64) - self.lo) / (self.hi - self.lo)
        return np.rint(self.bottom - fraction * (self.bottom - self.top)).astype(np.int64)


def nice_ticks(lo: float, hi: float, most: int = 8) -> tuple[np.ndarray, list[str]]:
    """Round values in [lo, hi], at most `most` steps of 1, 2, 2.5 or 5 times a power of ten apart, and their labels."""
    span = hi - lo
    magnitude = 10.0 ** np.floor(np.log10(span / most))
    mantissa = next(m for m in (1, 2, 2.5, 5, 10) if span / (magnitude * m) <= most)
    step = magnitude * mantissa
    ticks = np.arange(np.ceil(lo / step), np.floor(hi / step) + 1) * step
    decimals = max(0, int(-np.floor(np.log10(step) + 1e-9)) + (mantissa == 2.5))  # 0.25 -> 2, 2.5 -> 1, 25 -> 0
    return ticks, [f"{tick:.{decimals}f}" for tick in ticks + 0.0]


def class_distribution(scores: pd.DataFrame, column: str, group: str, path: Path, title: str) -> Path:
    """Box plot of `column` per value of `group` (one box per class, sorted by median), so a class that is
    easy or hard as a whole, or a class with a long tail of hard samples, stands out.

    Boxes as matplotlib's `boxplot`: quartiles, the median in orange, whiskers to the furthest sample within
    1.5 box heights, the samples beyond as circles. Drawn with PIL in DejaVu Sans, as the panels (~20 ms
    CPU for ten classes, where matplotlib took ~0.17 s and 0.4 s to import); the numbers of each box are in
    the PNG's `action_scores.boxes` text chunk (JSON).
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    grouped = scores.groupby(group)[column]
    order = grouped.median().sort_values(ascending=False).index.tolist()
    boxes = [box_stats(str(name), grouped.get_group(name).to_numpy()) for name in order]
    left, right, top, bottom = BOX_MARGINS
    width, height = max(BOX_SIZE[0], BOX_SLOT * len(boxes) + BOX_ROOM), BOX_SIZE[1]
    plot_right, plot_bottom = width - right, height - bottom
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    small, letters, bold = font(11), font(CAPTION_PIXELS_FONT), font(CAPTION_PIXELS_FONT + 1, bold=True)

    title_lines = wrap_to_width(title, lambda line: bold.getlength(line) <= width - 2 * GAP)[:2]
    for number, line in enumerate(title_lines):
        draw.text((width / 2, 12 + number * LINE_PIXELS), line, font=bold, fill=BOX_INK, anchor="ma")
    scale = ValueRows.around(boxes, top + (len(title_lines) - 1) * LINE_PIXELS, plot_bottom)
    ticks, labels = nice_ticks(scale.lo, scale.hi)
    widest = max((letters.getlength(label) for label in labels), default=0.0)
    left = max(left, int(widest) + 14 + LINE_PIXELS + 6)  # 7-digit values push the boxes right, not over the label
    for row, label in zip(scale.rows(ticks), labels):
        draw.line([(left + 1, row), (plot_right - 1, row)], fill=BOX_GRID)
        draw.line([(left - 5, row), (left, row)], fill=BOX_INK)
        draw.text((left - 8, row), label, font=letters, fill=BOX_INK, anchor="rm")
    draw.rectangle([left, scale.top, plot_right, plot_bottom], outline=BOX_INK)
    axis_label = _cut_to(column, plot_bottom - scale.top, letters)
    label_box = Image.new("L", (int(letters.getlength(axis_label)) + 2, LINE_PIXELS), 255)
    ImageDraw.Draw(label_box).text((1, 0), axis_label, font=letters, fill=BOX_INK)
    label_box = label_box.rotate(90, expand=True)
    beside_values = left - 14 - widest - label_box.width
    canvas.paste(label_box, (max(4, int(beside_values)), (scale.top + plot_bottom - label_box.height) // 2))

    slot = (plot_right - left) / max(1, len(boxes))
    half = max(2, round(slot * 0.25))
    for index, box in enumerate(boxes):
        middle = round(left + (index + 0.5) * slot)
        for number, line in enumerate((box.name, f"(n={box.count})")):
            draw.text((middle, plot_bottom + 6 + number * 15), _cut_to(line, int(slot) - 2, small), font=small,
                      fill=BOX_INK, anchor="ma")
        if not box.count:
            continue
        q1, median, q3, low, high = scale.rows([box.q1, box.median, box.q3, box.low, box.high]).tolist()
        draw.line([(middle, q3), (middle, high)], fill=BOX_INK)
        draw.line([(middle, q1), (middle, low)], fill=BOX_INK)
        for end in (low, high):
            draw.line([(middle - half // 2, end), (middle + half // 2, end)], fill=BOX_INK)
        draw.rectangle([middle - half, q3, middle + half, q1], outline=BOX_INK)
        draw.line([(middle - half + 1, median), (middle + half - 1, median)], fill=BOX_MEDIAN, width=2)
        for row in np.unique(scale.rows(box.outliers)).tolist():  # samples on one row share a circle
            draw.ellipse([middle - 3, row - 3, middle + 3, row + 3], outline=BOX_INK)

    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    info.add_text(BOXES_KEY, json.dumps([box.described() for box in boxes]))
    canvas.putpalette([*BOX_MEDIAN_COLOUR, *np.repeat(np.arange(1, 256), 3).tolist()])  # "L" -> "P"
    canvas.save(path, format="PNG", pnginfo=info, compress_level=6)
    return path


def matrices(named: Sequence[tuple[str, pd.DataFrame]], path: Path, title: str) -> Path:
    """Heatmaps side by side, one per (name, square frame with the same labels on both axes), values written in."""
    figure = agg_figure(5.5 * len(named), 5.0)
    for index, (name, matrix) in enumerate(named, start=1):
        axes = figure.add_subplot(1, len(named), index)
        values = matrix.to_numpy(dtype=np.float64)
        image = axes.imshow(values, vmin=min(0.0, np.nanmin(values)), vmax=1.0, cmap="viridis")
        labels = [str(label) for label in matrix.index]
        axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        axes.set_yticks(range(len(labels)), labels, fontsize=8)
        for (row, col), value in np.ndenumerate(values):
            axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="black" if value > 0.6 else "white")
        axes.set_title(name)
        figure.colorbar(image, ax=axes, fraction=0.046)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


DATA_MAP_POINTS = 20_000  # at most this many samples drawn, chosen with DATA_MAP_SEED: readable, and fast at 1M
DATA_MAP_SEED = 0
DATA_MAP_KEY = "action_scores.data_map"  # PNG text chunk: what the map shows, as JSON


def data_map_points(scores: pd.DataFrame, max_points: int = DATA_MAP_POINTS) -> pd.DataFrame:
    """The samples a data map shows: all, or `max_points` of them drawn without replacement with DATA_MAP_SEED
    (in the table's order), so that the PNG and a tracker's own chart of the same table show the same points."""
    if len(scores) <= max_points:
        return scores
    chosen = np.random.default_rng(DATA_MAP_SEED).choice(len(scores), max_points, replace=False)
    return scores.iloc[np.sort(chosen)]


def data_map(scores: pd.DataFrame, path: Path, title: str, max_points: int = DATA_MAP_POINTS) -> Path:
    """Dataset Cartography's data map (Swayamdipta et al., EMNLP 2020, Fig. 1): each sample's `confidence`
    (y) against its `variability` (x), coloured by `correctness`, with the lines of the `region` rule
    (`tracking.scoring.regions`) and each region's share of the split. The regions and their counts are
    the scores table's own; the scatter shows at most `max_points` samples, drawn without replacement
    with a fixed seed, so the same table gives the same picture; the title says how many. What the map
    shows is in the PNG's `action_scores.data_map` text chunk (JSON: samples, shown, cut, region counts)."""
    from tracking.scoring import regions

    lacking = [c for c in (*regions.NEEDS, regions.REGION) if c not in scores.columns]
    if lacking:
        raise ActionScoresError(f"no data map for {path.name}: the scores table has no {', '.join(lacking)} "
                                "(recorded p_true is needed; see tracking.record.classification_columns)")
    total = len(scores)
    shown = data_map_points(scores, max_points)
    variability = shown["variability"].to_numpy(np.float64)
    cut = regions.variability_cut(scores["variability"].to_numpy(np.float64))
    right = max(float(scores["variability"].max()), cut) * 1.08 or 0.01  # room right of the cut, even at 0

    figure = agg_figure(PANEL_WIDTH + 0.7, 5.4)
    axes = figure.add_subplot()
    colour = {"c": shown["correctness"].to_numpy(np.float64), "cmap": "viridis", "vmin": 0.0, "vmax": 1.0} \
        if "correctness" in shown.columns else {"color": "tab:blue"}
    points = axes.scatter(variability, shown["confidence"].to_numpy(np.float64), s=7, alpha=0.6, linewidths=0,
                          rasterized=True, **colour)
    axes.axvline(cut, color="black", linestyle="--", linewidth=1.2,
                 label=f"variability {cut:.3f}: ambiguous to the right (top third)")
    axes.plot([0.0, cut], [regions.EASY_CONFIDENCE] * 2, color="black", linestyle=":", linewidth=1.4,
              label=f"confidence {regions.EASY_CONFIDENCE}: easy-to-learn above, hard-to-learn below")
    counts = scores[regions.REGION].value_counts()
    boxed = {"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.85, "edgecolor": "none"}
    for name, x, y in ((regions.EASY, cut / 2, 0.93), (regions.HARD, cut / 2, 0.07),
                       (regions.AMBIGUOUS, (cut + right) / 2, 0.5)):
        count = int(counts.get(name, 0))
        axes.text(x, y, f"{name}\n{count:,} ({count / total:.0%})", ha="center", va="center", fontsize=CAPTION_POINTS,
                  fontweight="bold", bbox=boxed, clip_on=True)
    axes.set_xlim(0.0, right)
    axes.set_ylim(0.0, 1.0)
    axes.set_xlabel("variability (std over epochs of p_true)", fontsize=CAPTION_POINTS)
    axes.set_ylabel("confidence (mean over epochs of p_true)", fontsize=CAPTION_POINTS)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=CAPTION_POINTS - 1, frameon=False)
    if "correctness" in shown.columns:
        figure.colorbar(points, ax=axes, fraction=0.05, pad=0.02).set_label(
            "correctness (fraction of epochs correct)", fontsize=CAPTION_POINTS)
    sample = f"{len(shown):,} of {total:,} samples shown (seed {DATA_MAP_SEED})" if len(shown) < total \
        else f"all {total:,} samples"
    axes.set_title(f"{title}\n{sample}", fontsize=CAPTION_POINTS + 1)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    described = {"samples": total, "shown": len(shown), "variability_cut": cut,
                 "regions": {name: int(counts.get(name, 0)) for name in regions.REGIONS}}
    figure.savefig(path, dpi=DPI, metadata={DATA_MAP_KEY: json.dumps(described)})
    return path
