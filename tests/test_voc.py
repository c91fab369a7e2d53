"""PASCAL VOC at small scale: the test writes a few images in the VOC XML layout itself, then
`mlflow run . -e detect -P dataset=voc2007` loads them, trains, records the three parts per image,
and `action-scores analyze` draws the boxed panels in the order of the scores."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import BIN, run_command
from experiments.detection_data import VOC_CLASSES, load_detection_split
from tracking.errors import ActionScoresError
from tracking.report.panels import read_panel_rows

PARTS = ("loc", "pos", "neg")
# Per split: (image id, [(class, [xmin, ymin, xmax, ymax]), ...]) on 96x72 pictures.
VOC_IMAGES = {
    "train": [
        ("000012", [("car", [10, 20, 60, 60])]),
        ("000017", [("person", [5, 5, 30, 70]), ("horse", [35, 20, 90, 68])]),
        ("000023", [("bicycle", [20, 10, 80, 60])]),
        ("000026", [("car", [2, 30, 40, 70]), ("car", [50, 30, 94, 70])]),
    ],
    "val": [
        ("000005", [("chair", [10, 20, 50, 60])]),
        ("000007", [("car", [5, 5, 80, 40]), ("person", [30, 10, 45, 60])]),
        ("000009", [("horse", [1, 2, 90, 70]), ("person", [40, 5, 60, 50]), ("dog", [2, 40, 20, 70])]),
        ("000016", [("bicycle", [30, 15, 70, 55])]),
        ("000019", [("cat", [20, 10, 76, 66])]),  # beyond --limit 4
    ],
}


def write_voc(root: Path) -> Path:
    """`root`/VOCdevkit/VOC2007 with JPEGImages/, Annotations/ and ImageSets/Main/{train,val}.txt:
    grey pictures with a coloured rectangle per object, so that boxes cover something to learn."""
    base = root / "VOCdevkit" / "VOC2007"
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for split, images in VOC_IMAGES.items():
        for image_id, objects in images:
            pixels = np.full((72, 96, 3), 90, dtype=np.uint8)
            for index, (name, (x1, y1, x2, y2)) in enumerate(objects):
                pixels[y1:y2, x1:x2] = [(40 * VOC_CLASSES.index(name)) % 256, 200 - 50 * index, 60]
            Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg")
            xml_objects = "".join(
                f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>96</width><height>72</height>"
                f"<depth>3</depth></size>{xml_objects}</annotation>")
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(i for i, _ in images) + "\n")
    return root


def test_voc_layout_loads_through_vocdetection(tmp_path: Path) -> None:
    write_voc(tmp_path)
    for name, images in VOC_IMAGES.items():
        split = load_detection_split("voc2007", name, str(tmp_path))
        assert len(split.dataset) == len(images)
        for index, (_, objects) in enumerate(images):
            picture, boxes, labels = split.dataset.scene(index)
            assert picture.shape == (72, 96, 3)
            assert boxes.tolist() == [b for _, b in objects]
            assert [split.class_names[label] for label in labels] == [name for name, _ in objects]
            tensor, target = split.dataset[index]
            assert tuple(tensor.shape) == (3, 72, 96) and target["labels"].tolist() == labels.tolist()
        assert split.class_names[1:] == VOC_CLASSES


def test_voc_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match="needs --data-root"):
        load_detection_split("voc2007", "val", None)
    with pytest.raises(ActionScoresError, match=r"VOCdevkit/VOC2007 not found"):
        load_detection_split("voc2007", "val", str(tmp_path))
    with pytest.raises(ActionScoresError, match="unknown detection dataset 'coco'"):
        load_detection_split("coco", "val", None)


def test_a_last_batch_of_one_image_is_refused_before_the_run_opens(tmp_path: Path) -> None:
    """SSDlite's BatchNorm cannot train on one image (its 1x1 maps): 3 images at batch size 2 say so."""
    from experiments.detect import main

    root = write_voc(tmp_path)
    with pytest.raises(ActionScoresError, match=r"the last training batch would hold a single image \(3 training "
                                                r"images, batch size 2\).*change --batch-size or --limit by one"):
        main(["--dataset", "voc2007", "--data-root", str(root), "--limit", "3", "--batch-size", "2",
              "--image-size", "64", "--tracker", "mlflow", "--experiment", "never-opened"])


def test_voc_detect_entry_point_records_three_parts_and_draws_boxed_panels_in_score_order(
        mlflow_server: str, tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc")
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    trained = run_command(
        [str(BIN / "mlflow"), "run", ".", "-e", "detect", "--env-manager", "local",
         "--experiment-name", f"voc-{uuid.uuid4().hex[:6]}", "-P", "dataset=voc2007", "-P", f"data_root={root}",
         "-P", "limit=4", "-P", "image_size=64", "-P", "epochs=2", "-P", "batch_size=2"], env)
    run_id = re.search(r"Run \(ID '(\w+)'\) succeeded", trained.stderr + trained.stdout).group(1)
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    # voc2007's default model, at the asked size, on the first 4 images of each split.
    assert {k: run.data.params[k] for k in ("detector", "input_size", "limit")} == {
        "detector": "ssdlite", "input_size": "64", "limit": "4"}
    maps = client.get_metric_history(run_id, "val_map_50")
    assert [m.step for m in maps] == [0, 1] and all(0 <= m.value <= 1 for m in maps)

    local = Path(client.download_artifacts(run_id, "per_sample_losses/val", str(tmp_path / "in")))
    tables = [pd.read_parquet(p) for p in sorted(local.glob("epoch_*.parquet"))]
    assert len(tables) == 2
    for table in tables:
        assert table["sample_id"].tolist() == [0, 1, 2, 3]
        assert table["num_objects"].tolist() == [len(objects) for _, objects in VOC_IMAGES["val"][:4]]
        for part in PARTS:
            assert np.isfinite(table[f"loss_{part}"]).all() and (table[f"loss_{part}"] > 0).all()
        np.testing.assert_allclose(table["loss"], sum(table[f"loss_{p}"].astype(np.float64) for p in PARTS),
                                   rtol=1e-6)
    assert not tables[0]["loss"].equals(tables[1]["loss"])  # a step was taken between the epochs

    run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id], env)
    out = Path(client.download_artifacts(run_id, "action_scores/val", str(tmp_path / "out")))
    for part in PARTS:
        action = sum(t.set_index("sample_id")[f"loss_{part}"].astype(np.float64) for t in tables)
        hardest = read_panel_rows(out / part / "hardest.png")[0]
        assert hardest["sample_ids"] == [int(i) for i, _ in sorted(action.items(), key=lambda kv: (-kv[1], kv[0]))]
        easiest = read_panel_rows(out / part / "easiest.png")[0]
        assert easiest["sample_ids"] == hardest["sample_ids"][::-1]
    # The real pictures with their boxes: the box colour (255, 40, 40) is in the panel, never in the pictures.
    pixels = np.asarray(Image.open(out / "loc" / "hardest.png").convert("RGB")).astype(int)
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)).sum() > 100
    scores = pd.read_parquet(out / "scores.parquet").set_index("sample_id")
    assert "num_objects" not in scores  # the object counts are the view's (from the media's boxes), never saved
    media = pd.read_parquet(client.download_artifacts(run_id, "per_sample_media/val/media.parquet", str(tmp_path / "m")))
    assert [len(boxes) for boxes in media.sort_values("sample_id")["boxes"]] == [1, 2, 3, 1]
