"""Panels show the right samples in the right order, captioned, upscaled, grouped by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tracking.data import load_split
from tracking.panels import draw_boxes, ranked_panels, read_panel_rows, upscale


def _scores() -> pd.DataFrame:
    """Twelve digits with hand-picked actions, including a tie (samples 3 and 8 at 5.0)."""
    test = load_split("digits", "test")
    ids = np.arange(12)
    action = np.array([1.0, 9.0, 2.5, 5.0, 0.5, 7.0, 3.0, 6.0, 5.0, 0.1, 8.0, 4.0])
    labels = test.labels[ids]
    return pd.DataFrame({"sample_id": ids, "action": action, "label": labels,
                         "label_name": [test.class_names[i] for i in labels]})


def test_hardest_and_easiest_rows_in_order(tmp_path: Path) -> None:
    scores = _scores()
    test = load_split("digits", "test")
    written = ranked_panels(scores, "action", 5, tmp_path, test.image, lambda row: row["label_name"],
                            groups="label_name")
    pairs = list(zip(scores["sample_id"], scores["action"]))
    hardest = [int(i) for i, _ in sorted(pairs, key=lambda p: (-p[1], p[0]))[:5]]
    easiest = [int(i) for i, _ in sorted(pairs, key=lambda p: (p[1], p[0]))[:5]]
    assert hardest == [1, 10, 5, 7, 3]  # the tie 3/8 goes to the lower id
    assert read_panel_rows(tmp_path / "hardest.png")[0]["sample_ids"] == hardest
    assert read_panel_rows(tmp_path / "easiest.png")[0]["sample_ids"] == easiest
    captions = read_panel_rows(tmp_path / "hardest.png")[0]["captions"]
    assert captions[0] == f"action 9\n{scores.loc[1, 'label_name']}"

    by_class = sorted(p.name for p in (tmp_path / "by_class").iterdir())
    assert by_class == sorted(f"{name}.png" for name in scores["label_name"].unique())
    for name, group in scores.groupby("label_name"):
        rows = read_panel_rows(tmp_path / "by_class" / f"{name}.png")
        assert [r["title"] for r in rows] == ["hardest", "easiest"]
        assert rows[0]["sample_ids"] == group.sort_values(["action", "sample_id"], ascending=[False, True])[
            "sample_id"].tolist()[:5]
    assert len(written) == 2 + len(by_class)


def test_small_images_are_upscaled(tmp_path: Path) -> None:
    assert upscale(np.zeros((8, 8), np.uint8)).shape == (96, 96)
    assert upscale(np.zeros((32, 40, 3), np.uint8)).shape == (96, 120, 3)
    scores = _scores()
    ranked_panels(scores, "action", 10, tmp_path, load_split("digits", "test").image, lambda row: "x")
    width, height = Image.open(tmp_path / "hardest.png").size
    assert width >= 10 * 96 and height >= 96


def test_boxes_are_drawn_where_the_objects_are() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    drawn = draw_boxes(image, np.array([[8.0, 8.0, 32.0, 40.0]]), ["cat"], min_side=128)
    assert drawn.shape == (128, 128, 3)
    assert tuple(drawn[16, 40]) == (255, 40, 40)  # left edge of the box, upscaled x2: x=16, y between 16 and 80
    assert tuple(drawn[100, 100]) == (0, 0, 0)
