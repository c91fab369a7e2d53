"""Panels show the right samples in the right order, captioned, upscaled, grouped by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tracking.report.views import classification_view
from experiments.datasets import SplitData, load_split
from tracking.errors import ActionScoresError
from tracking.report.panels import PanelItem, ranked_panels, read_panel_rows, render_panel, safe_file_names
from tracking.report.pictures import draw_boxes, upscale
from tracking.scoring.rank import pick


@pytest.fixture(scope="module")
def digits() -> SplitData:
    return load_split("digits", "test")


def _scores(digits: SplitData) -> pd.DataFrame:
    """The first four test digits of each of the classes 0, 1 and 2, with hand-picked actions
    that tie across classes (5.0) and within class 1 (2.0)."""
    ids = [int(i) for label in (0, 1, 2) for i in np.flatnonzero(digits.labels == label)[:4]]
    action = [1.0, 9.0, 2.5, 5.0, 0.5, 2.0, 3.0, 2.0, 5.0, 0.1, 8.0, 4.0]
    return pd.DataFrame({"sample_id": ids, "label": digits.labels[ids], "action": action})


def classification_panels(scores: pd.DataFrame, split: SplitData, column: str, k: int, out: Path,
                          higher_is_harder: bool | None = None, labels: np.ndarray | None = None) -> list[Path]:
    """What the post-hoc job draws for a classification split: rank once, then render; `labels`, the
    data's labels (default: the split's own). The scores are left as they are."""
    columns = list(scores.columns)
    view = classification_view(scores["sample_id"].to_numpy(), split.image,
                               split.labels if labels is None else labels, split.class_names, "digits", "test")
    picked = pick(view.frame(scores), column, k, view.groups, higher_is_harder)
    written = ranked_panels(picked, out, view.picture, view.label, split_size=view.size)[0]
    assert list(scores.columns) == columns  # the view never adds columns to what the job saves
    return written


def _ranked(records: list[tuple[int, float]], k: int, hardest_first: bool) -> list[int]:
    """Expected order, computed apart from tracking.scoring.rank: by score, ties by ascending id."""
    key = (lambda r: (-r[1], r[0])) if hardest_first else (lambda r: (r[1], r[0]))
    return [sample_id for sample_id, _ in sorted(records, key=key)[:k]]


def test_a_panel_of_grey_pictures_is_saved_grey_with_the_pixels_of_the_rgb_drawing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(7)]

    def rows(pictures: list[np.ndarray]) -> list[tuple[str, list[PanelItem]]]:
        items = [PanelItem(i, picture, f"action {i * 1.234:.3g}\nclass {i}") for i, picture in enumerate(pictures)]
        return [("hardest", items), ("easiest", items[::-1])]

    as_grey = render_panel(rows(grey), tmp_path / "grey.png", "seven digits, hardest and easiest")
    as_rgb = render_panel(rows([np.stack([g] * 3, axis=-1) for g in grey]), tmp_path / "rgb.png",
                          "seven digits, hardest and easiest")
    with Image.open(as_grey) as saved_grey, Image.open(as_rgb) as saved_rgb:
        assert (saved_grey.mode, saved_rgb.mode) == ("L", "RGB")
        pixels, reference = np.asarray(saved_grey), np.asarray(saved_rgb)
    assert (reference == pixels[..., None]).all()  # the same picture, one channel instead of three
    assert read_panel_rows(as_grey) == read_panel_rows(as_rgb)


def test_hardest_easiest_and_by_class_rows(tmp_path: Path, digits: SplitData) -> None:
    scores = _scores(digits)
    written = classification_panels(scores, digits, "action", 5, tmp_path)
    records = list(zip(scores["sample_id"].tolist(), scores["action"].tolist()))
    action_of = dict(records)

    hardest_rows = read_panel_rows(tmp_path / "hardest.png")
    assert [row["title"] for row in hardest_rows] == ["hardest"]
    assert hardest_rows[0]["sample_ids"] == _ranked(records, 5, hardest_first=True)
    assert hardest_rows[0]["sample_ids"][2:4] == sorted(i for i, a in records if a == 5.0)  # the tie, by id
    assert read_panel_rows(tmp_path / "easiest.png")[0]["sample_ids"] == _ranked(records, 5, hardest_first=False)
    for sample_id, caption in zip(hardest_rows[0]["sample_ids"], hardest_rows[0]["captions"]):
        assert caption == f"action {action_of[sample_id]:.3g}\n{digits.labels[sample_id]}"

    assert sorted(p.name for p in (tmp_path / "by_class").iterdir()) == ["0.png", "1.png", "2.png"]
    for label in (0, 1, 2):
        mine = [(i, a) for i, a in records if digits.labels[i] == label]
        rows = read_panel_rows(tmp_path / "by_class" / f"{label}.png")
        assert [row["title"] for row in rows] == ["hardest", "easiest"]
        assert rows[0]["sample_ids"] == _ranked(mine, 5, hardest_first=True)  # 4 < k: the whole class
        assert rows[1]["sample_ids"] == _ranked(mine, 5, hardest_first=False)
        assert all(caption.endswith(f"\n{label}") for row in rows for caption in row["captions"])
    assert sorted(written) == sorted([tmp_path / "hardest.png", tmp_path / "easiest.png",
                                      *(tmp_path / "by_class" / f"{label}.png" for label in (0, 1, 2))])


def test_small_images_are_upscaled(tmp_path: Path, digits: SplitData) -> None:
    assert upscale(np.zeros((8, 8), np.uint8)).shape == (96, 96)
    assert upscale(np.zeros((32, 40, 3), np.uint8)).shape == (96, 120, 3)
    assert upscale(np.zeros((200, 300, 3), np.uint8)).shape == (200, 300, 3)
    scores = pd.DataFrame({"sample_id": range(10), "label": digits.labels[:10], "action": np.arange(10.0)})
    classification_panels(scores, digits, "action", 10, tmp_path)
    with Image.open(tmp_path / "hardest.png") as png:
        width, height = png.size
    assert 5 * 96 <= width <= 680 and height >= 2 * 96  # 2 x 5 tiles of 96 px: fits MLflow's artifact pane


def test_class_names_become_distinct_safe_file_names(tmp_path: Path) -> None:
    assert safe_file_names(["a/b", "a_b", "..", "ok-1.x"]) == {"a/b": "a_b", "a_b": "a_b-2", "..": "class",
                                                                "ok-1.x": "ok-1.x"}
    pictures = np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3)
    labels = np.array([0, 1, 2, 2])
    split = SplitData(dataset=None, class_names=["a/b", "a_b", "straße"], labels=labels,  # type: ignore[arg-type]
                      picture=lambda i: pictures[i])
    scores = pd.DataFrame({"sample_id": [0, 1, 2, 3], "label": labels, "loss_sum": [1.0, 2.0, 3.0, 1234.5]})
    classification_panels(scores, split, "loss_sum", 2, tmp_path, higher_is_harder=True)
    assert sorted(p.name for p in (tmp_path / "by_class").iterdir()) == ["a_b-2.png", "a_b.png", "stra_e.png"]
    assert read_panel_rows(tmp_path / "by_class" / "a_b.png")[0]["captions"] == ["loss_sum 1\na/b"]
    assert read_panel_rows(tmp_path / "by_class" / "stra_e.png")[0]["captions"] == [
        "loss_sum 1.23e+03\nstraße", "loss_sum 3\nstraße"]


def test_render_panel_round_trips_its_rows(tmp_path: Path) -> None:
    grey, colour = np.full((8, 8), 200, np.uint8), np.zeros((40, 30, 3), np.uint8)
    rows = [("first", [PanelItem(7, grey, "seven"), PanelItem(3, colour, "three\nx")]),
            ("second", [PanelItem(11, colour, "eleven")]),
            ("empty", [])]
    path = render_panel(rows, tmp_path / "deep" / "panel.png", "a title")
    assert path == tmp_path / "deep" / "panel.png"
    assert read_panel_rows(path) == [
        {"title": "first", "sample_ids": [7, 3], "captions": ["seven", "three\nx"]},
        {"title": "second", "sample_ids": [11], "captions": ["eleven"]},
        {"title": "empty", "sample_ids": [], "captions": []},
    ]
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(ActionScoresError, match="has no 'action_scores.rows' text chunk"):
        read_panel_rows(tmp_path / "plain.png")


def test_bad_scores_are_refused(tmp_path: Path, digits: SplitData) -> None:
    scores = _scores(digits)
    with pytest.raises(ActionScoresError, match=r"data found has 360 samples but the tables have sample ids \[360\]"):
        classification_panels(scores.assign(sample_id=scores["sample_id"].replace(0, 360)), digits, "action", 3,
                              tmp_path)
    with pytest.raises(ActionScoresError, match=r"labels \[10\] have no class name"):
        classification_panels(scores, digits, "action", 3, tmp_path, labels=np.where(digits.labels == 0, 10, digits.labels))
    with pytest.raises(ActionScoresError, match="k must be at least 1"):
        classification_panels(scores, digits, "action", 0, tmp_path)
    with pytest.raises(ActionScoresError, match="the table is empty"):
        classification_panels(scores.iloc[:0], digits, "action", 3, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_boxes_are_drawn_where_the_objects_are() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    drawn = draw_boxes(image, np.array([[8.0, 8.0, 32.0, 40.0]]), ["cat"], min_side=128)
    assert drawn.shape == (128, 128, 3)
    assert tuple(drawn[16, 40]) == (255, 40, 40)  # top edge of the box, upscaled x2: y=16, x between 16 and 64
    assert tuple(drawn[100, 100]) == (0, 0, 0)
