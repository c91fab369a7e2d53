"""Plots of whole score columns (not pictures of samples): per-class distributions, run-vs-run matrices,
the data map.

Drawn on a bare Agg canvas, so plotting never changes the caller's backend.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tracking.errors import ActionScoresError
from tracking.report.panels import CAPTION_POINTS, DPI, PANEL_WIDTH

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def agg_figure(width: float, height: float) -> Figure:
    """A figure of `width` x `height` inches on its own Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def class_distribution(scores: pd.DataFrame, column: str, group: str, path: Path, title: str) -> Path:
    """Box plot of `column` per value of `group` (one box per class, sorted by median), so a class that is
    easy or hard as a whole, or a class with a long tail of hard samples, stands out."""
    grouped = scores.groupby(group)[column]
    order = grouped.median().sort_values(ascending=False).index.tolist()
    width, height = max(6.0, 0.6 * len(order) + 2), 4.5
    figure = agg_figure(width, height)
    # Margins in inches, fixed (room for the title, two-line class labels and 7-digit values): `tight_layout`
    # would lay every label out once more before the drawing, 40% of the figure's time.
    figure.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.6 / height, top=1 - 0.4 / height)
    axes = figure.add_subplot()
    axes.boxplot([grouped.get_group(name).to_numpy() for name in order], showfliers=True)
    axes.set_xticks(range(1, len(order) + 1), [f"{name}\n(n={len(grouped.get_group(name))})" for name in order],
                    fontsize=8)
    axes.set_ylabel(column)
    axes.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
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
