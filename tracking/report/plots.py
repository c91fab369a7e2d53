"""Plots of whole score columns (not pictures of samples): per-class distributions, run-vs-run matrices.

Drawn on a bare Agg canvas, as the panels are, so plotting never changes the caller's backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

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
    figure = agg_figure(max(6.0, 0.6 * len(order) + 2), 4.5)
    axes = figure.add_subplot()
    axes.boxplot([grouped.get_group(name).to_numpy() for name in order], showfliers=True)
    axes.set_xticks(range(1, len(order) + 1), [f"{name}\n(n={len(grouped.get_group(name))})" for name in order],
                    fontsize=8)
    axes.set_ylabel(column)
    axes.set_title(title)
    figure.tight_layout()
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
