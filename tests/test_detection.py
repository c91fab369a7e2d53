"""Detection end to end on the real MLflow server and digit-scenes reproducibility (VOC: tests/test_voc.py)."""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from tests.conftest import BIN, run_command
from experiments.detection_data import digit_scenes
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
    assert "num_objects" not in scores and "median_box_size" not in scores  # the view's, never saved
    # The panels came from the media training recorded: thumbnails with their boxes and class names.
    media = pd.read_parquet(client.download_artifacts(run_id, "per_sample_media/val/media.parquet", str(tmp_path)))
    assert media["sample_id"].tolist() == list(range(48))
    for sample_id in (0, 47):
        image, boxes, labels = scenes.scene(sample_id)
        recorded = media.at[sample_id, "boxes"]
        np.testing.assert_allclose([[box[c] for c in ("x1", "y1", "x2", "y2")] for box in recorded], boxes / 2)
        assert [box["label_name"] for box in recorded] == [str(label - 1) for label in labels]


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
