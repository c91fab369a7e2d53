"""The per-class distribution: boxes with matplotlib's numbers, where the numbers say, drawn without matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tracking.report.plots import (BOX_INK, BOX_MEDIAN_COLOUR, BOXES_KEY, ValueRows, box_stats, class_distribution,
                                   nice_ticks)

REPO = Path(__file__).resolve().parents[1]


def test_box_stats_are_matplotlibs() -> None:
    """Quartiles, Tukey whiskers and outliers as matplotlib's `boxplot` computes them, NaNs left out."""
    from matplotlib import cbook

    values = np.r_[np.arange(1.0, 10.0), 100.0]
    box = box_stats("a", np.r_[values, np.nan])
    assert (box.count, box.q1, box.median, box.q3, box.low, box.high) == (10, 3.25, 5.5, 7.75, 1.0, 9.0)
    assert box.outliers.tolist() == [100.0]
    skewed = np.random.default_rng(0).lognormal(-2, 1.2, 500)
    ours, theirs = box_stats("b", skewed), cbook.boxplot_stats(skewed)[0]
    assert (ours.q1, ours.median, ours.q3, ours.low, ours.high) == pytest.approx(
        (theirs["q1"], theirs["med"], theirs["q3"], theirs["whislo"], theirs["whishi"]))
    assert sorted(ours.outliers.tolist()) == sorted(theirs["fliers"].tolist())
    assert box_stats("empty", np.array([np.nan])).count == 0


def test_value_rows_and_ticks() -> None:
    rows = ValueRows(0.0, 10.0, top=40, bottom=440)
    assert rows.rows([0.0, 5.0, 10.0, 2.5]).tolist() == [440, 240, 40, 340]
    assert nice_ticks(-0.28, 5.6) == (pytest.approx([0, 1, 2, 3, 4, 5]), ["0", "1", "2", "3", "4", "5"])
    assert nice_ticks(-0.05, 1.05)[1] == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert nice_ticks(0.0, 1.0, most=4)[1] == ["0.00", "0.25", "0.50", "0.75", "1.00"]
    assert nice_ticks(0.0, 200.0)[1] == ["0", "25", "50", "75", "100", "125", "150", "175", "200"]
    assert nice_ticks(-2.0, 18.0)[1] == ["0.0", "2.5", "5.0", "7.5", "10.0", "12.5", "15.0", "17.5"]


def test_medians_are_drawn_at_their_rows(tmp_path: Path) -> None:
    """Three classes with medians 50, 30 and 10: sorted by median, each orange median line on the row
    its value maps to inside the plot's frame, the PNG 600 x 450 with each box's numbers in its text chunk."""
    spread = np.linspace(0.0, 100.0, 101)
    frame = pd.DataFrame({"action": np.r_[spread, spread * 0.6, spread * 0.2],
                          "label": ["mid"] * 101 + ["low"] * 101 + ["lowest"] * 101})
    path = class_distribution(frame, "action", "label", tmp_path / "d.png", "test: action per class")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 450)
        boxes = json.loads(image.text[BOXES_KEY])
        indices, pixels = np.asarray(image), np.asarray(image.convert("RGB"))
    assert [(b["name"], b["median"], b["count"]) for b in boxes] == [("mid", 50.0, 101), ("low", 30.0, 101),
                                                                     ("lowest", 10.0, 101)]
    framed = np.flatnonzero((indices == BOX_INK).sum(axis=1) > 0.8 * indices.shape[1])  # the frame's top and bottom
    top, bottom = int(framed.min()), int(framed.max())
    expected = ValueRows.around([box_stats(b["name"], frame.action[frame.label == b["name"]]) for b in boxes],
                                top, bottom).rows([b["median"] for b in boxes])
    orange = np.all(pixels == BOX_MEDIAN_COLOUR, axis=2)
    columns = np.flatnonzero(orange.any(axis=0))
    lines = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)  # one run of orange columns a box
    assert len(lines) == 3
    for line, row in zip(lines, expected):
        rows_drawn = np.flatnonzero(orange[:, line].any(axis=1))
        assert row in rows_drawn and rows_drawn.max() - rows_drawn.min() <= 1  # a 2-px line on the median's row
    wide = pd.DataFrame({"action": np.arange(100.0), "label": np.arange(100) % 10})
    with Image.open(class_distribution(wide, "action", "label", tmp_path / "ten.png", "ten")) as image:
        assert image.size == (800, 450)  # ten classes: 60 px each


def test_panels_and_distributions_never_import_matplotlib(tmp_path: Path) -> None:
    """A fresh interpreter that draws a panel and a distribution has not loaded matplotlib (0.4 CPU s)."""
    script = f"""
import sys
from pathlib import Path
import numpy as np, pandas as pd
from tracking.report.panels import PanelItem, render_panel
from tracking.report.plots import class_distribution
out = Path({str(tmp_path)!r})
render_panel([("hardest", [PanelItem(1, np.zeros((8, 8), np.uint8), "action 1\\ndigit 0")])], out / "p.png", "t")
frame = pd.DataFrame({{"action": np.arange(20.0), "label": np.arange(20) % 4}})
class_distribution(frame, "action", "label", out / "d.png", "t")
print(sorted(name for name in sys.modules if name.split(".")[0] == "matplotlib"))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)})
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "d.png").stat().st_size > 0
