"""Detection end to end on the real MLflow server, digit-scenes reproducibility, and VOC through VOCDetection."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import BIN, run_command
from experiments.detection_data import VOC_CLASSES, digit_scenes, load_detection_split
from tracking.errors import ActionScoresError
from tracking.report.panels import read_panel_rows

PARTS = ("loc", "pos", "neg")


def test_detect_then_analyze(mlflow_server: str, tmp_path: Path) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    trained = run_command([sys.executable, "-m", "experiments.detect", "--epochs", "2", "--limit", "48",
                           "--batch-size", "16", "--experiment", f"detect-{uuid.uuid4().hex[:6]}"], env)
    run_id = re.search(r"run (\w+) finished", trained.stdout).group(1)
    client = mlflow.MlflowClient(mlflow_server)
    local = Path(client.download_artifacts(run_id, "per_sample_losses/val", str(tmp_path / "in")))
    tables = [pd.read_parquet(p) for p in sorted(local.glob("epoch_*.parquet"))]
    assert len(tables) == 2
    for table in tables:
        assert {f"loss_{part}" for part in PARTS} <= set(table.columns)
        assert table["sample_id"].tolist() == list(range(48))
        parts_sum = sum(table[f"loss_{part}"].astype(np.float64) for part in PARTS)
        np.testing.assert_allclose(table["loss"], parts_sum, rtol=1e-6)
        assert (table["loss_loc"] > 0).all() and (table["loss_neg"] > 0).all()
        scenes = digit_scenes("val")
        assert table["num_objects"].tolist() == [len(scenes.scene(i)[2]) for i in range(48)]

    run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id], env)
    out = Path(client.download_artifacts(run_id, "action_scores/val", str(tmp_path / "out")))
    scores = pd.read_parquet(out / "scores.parquet").set_index("sample_id")
    for part in PARTS:
        expected = sum(t.set_index("sample_id")[f"loss_{part}"].astype(np.float64) for t in tables)
        np.testing.assert_allclose(scores[f"action_{part}"], expected.loc[scores.index], rtol=1e-12)
        rows = read_panel_rows(out / part / "hardest.png")
        order = sorted(expected.items(), key=lambda item: (-item[1], item[0]))
        assert rows[0]["sample_ids"] == [int(i) for i, _ in order[:10]]
        assert rows[0]["captions"][0].startswith(f"action_{part} ")
        assert (out / part / "easiest.png").exists()
    # Boxes are drawn: the panel has the box colour (pure-ish red), which scenes (gray) never have.
    pixels = np.asarray(Image.open(out / "loc" / "hardest.png").convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    assert red.sum() > 100
    assert scores["num_objects"].between(1, 6).all()
    assert scores["median_box_size"].between(0, 1).all()


def test_digit_scenes_are_reproducible_and_boxes_fit() -> None:
    first, second = digit_scenes("train"), digit_scenes("train")
    for index in (0, 17, 499):
        image_a, boxes_a, labels_a = first.scene(index)
        image_b, boxes_b, labels_b = second.scene(index)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(boxes_a, boxes_b)
        assert ((boxes_a[:, 2:] > boxes_a[:, :2]) & (boxes_a >= 0).all() & (boxes_a <= 128).all()).all()
        assert 1 <= len(labels_a) <= 6 and labels_a.min() >= 1 and labels_a.max() <= 10
    assert not np.array_equal(first.scene(0)[0], digit_scenes("val").scene(0)[0])


def _write_voc(root: Path) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """A VOC 2007 layout with three images: ids, and per image (class, box) pairs."""
    base = root / "VOCdevkit" / "VOC2007"
    images = [
        ("000005", [("chair", [10, 20, 50, 60])]),
        ("000007", [("car", [5, 5, 80, 40]), ("person", [30, 10, 45, 60])]),
        ("000009", [("horse", [1, 2, 90, 70]), ("person", [40, 5, 60, 50]), ("dog", [2, 40, 20, 70])]),
    ]
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True)
    for image_id, objects in images:
        Image.new("RGB", (100, 80), (30, 60, 90)).save(base / "JPEGImages" / f"{image_id}.jpg")
        xml_objects = "".join(
            f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
            f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename><size><width>100</width><height>80</height>"
            f"<depth>3</depth></size>{xml_objects}</annotation>")
    (base / "ImageSets" / "Main" / "val.txt").write_text("\n".join(i for i, _ in images) + "\n")
    return images


def test_voc_layout_loads_through_vocdetection(tmp_path: Path) -> None:
    images = _write_voc(tmp_path)
    split = load_detection_split("voc2007", "val", str(tmp_path))
    assert len(split.dataset) == 3
    for index, (_, objects) in enumerate(images):
        picture, boxes, labels = split.dataset.scene(index)
        assert picture.shape == (80, 100, 3)
        assert boxes.tolist() == [b for _, b in objects]
        assert [split.class_names[label] for label in labels] == [name for name, _ in objects]
        tensor, target = split.dataset[index]
        assert tuple(tensor.shape) == (3, 80, 100) and target["labels"].tolist() == labels.tolist()
    assert split.class_names[1:] == VOC_CLASSES


def test_voc_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match="needs --data-root"):
        load_detection_split("voc2007", "val", None)
    with pytest.raises(ActionScoresError, match=r"VOCdevkit/VOC2007 not found"):
        load_detection_split("voc2007", "val", str(tmp_path))
    with pytest.raises(ActionScoresError, match="unknown detection dataset 'coco'"):
        load_detection_split("coco", "val", None)
