"""Dataset Cartography's data map and regions: the rule on hand-made values, and the job on a hand-made run
of the real MLflow server (a training-pass split with p_true/correct gets `region` and the map; an
eval-only split without them gets neither)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.errors import ActionScoresError
from tracking.report.plots import DATA_MAP_KEY, data_map
from tracking.scoring.regions import AMBIGUOUS, EASY, HARD, assign, variability_cut

# p_true per epoch (4 epochs) of 7 training samples, chosen so each region is known by hand:
# variability (ddof 0): s1 0.40, s4 0.21 are the top two (7 // 3 = 2): ambiguous; the cut is the third, s3's 0.056.
P_TRUE = {
    0: [0.90, 0.95, 0.97, 0.99],  # confident, steady: easy-to-learn
    1: [0.10, 0.90, 0.10, 0.90],  # flips every epoch: ambiguous (confidence 0.5 does not matter)
    2: [0.05, 0.10, 0.05, 0.10],  # never learned: hard-to-learn
    3: [0.80, 0.85, 0.90, 0.95],  # easy-to-learn
    4: [0.20, 0.60, 0.30, 0.70],  # ambiguous
    5: [0.50, 0.50, 0.50, 0.50],  # confidence exactly 0.5, no variability: easy-to-learn (>= 0.5)
    6: [0.30, 0.35, 0.30, 0.35],  # hard-to-learn
}
EXPECTED = {0: EASY, 1: AMBIGUOUS, 2: HARD, 3: EASY, 4: AMBIGUOUS, 5: EASY, 6: HARD}
EPOCHS = 4


def test_rule_takes_the_top_third_by_variability_then_splits_the_rest_at_confidence_half() -> None:
    p = np.array([P_TRUE[i] for i in sorted(P_TRUE)]).T  # [epochs, samples]
    confidence, variability = p.mean(axis=0), p.std(axis=0)
    assert variability_cut(variability) == pytest.approx(np.std([0.80, 0.85, 0.90, 0.95]))
    assert assign(confidence, variability).tolist() == [EXPECTED[i] for i in sorted(P_TRUE)]


def test_rule_at_ties_and_without_variability() -> None:
    # One epoch: variability 0 everywhere, so nobody is ambiguous (not an arbitrary third by sample id).
    assert assign(np.array([0.9, 0.2, 0.5]), np.zeros(3)).tolist() == [EASY, HARD, EASY]
    # Ties at the cut stay out: 6 samples -> at most 2 ambiguous; the three tied at 0.3 are all below it.
    variability = np.array([0.1, 0.3, 0.3, 0.3, 0.0, 0.0])
    assert assign(np.full(6, 0.7), variability).tolist() == [EASY] * 6
    assert assign(np.full(6, 0.7), np.array([0.1, 0.4, 0.3, 0.2, 0.0, 0.0])).tolist() == [
        EASY, AMBIGUOUS, AMBIGUOUS, EASY, EASY, EASY]
    with pytest.raises(ActionScoresError, match="same scores table"):
        assign(np.zeros(3), np.zeros(4))


def _table(ids: list[int], losses: list[float], **extra: pa.Array) -> pa.Table:
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float32()), **extra})


def test_job_logs_regions_and_the_map_for_the_training_pass_split_only(mlflow_server: str, tmp_path: Path) -> None:
    client = mlflow.MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"datamap-{uuid.uuid4().hex[:8]}")).info.run_id
    client.log_param(run_id, "action_scores.scored_by.train", "train")
    client.log_param(run_id, "action_scores.scored_by.test", "eval")
    root = tmp_path / "run"
    ids = sorted(P_TRUE)
    for epoch in range(EPOCHS):
        p = [P_TRUE[i][epoch] for i in ids]
        train = _table(ids[::-1], [-float(np.log(x)) for x in p][::-1],  # any row order: the job sorts by id
                       target=pa.array([i % 3 for i in ids][::-1], pa.int64()),
                       p_true=pa.array(p[::-1], pa.float32()), correct=pa.array([x > 0.5 for x in p][::-1]))
        test = _table([0, 1, 2], [1.0, 2.0, 3.0])  # an eval pass of a loop without classification_columns
        for split, table in (("train", train), ("test", test)):
            (root / "per_sample_losses" / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "per_sample_losses" / split / f"epoch_{epoch:04d}.parquet")
    client.log_artifacts(run_id, str(root))
    client.set_terminated(run_id)

    result = analyze_run(MLflowTracker(mlflow_server), run_id, progress=False)

    assert result.status == "done"
    assert "action_scores/train/data_map.png" in result.panels
    files = {f.path for f in client.list_artifacts(run_id, "action_scores/train")}
    assert "action_scores/train/data_map.png" in files
    assert "action_scores/test/data_map.png" not in {f.path for f in client.list_artifacts(run_id, "action_scores/test")}
    assert "data map" not in result.message and "region" not in result.message  # only the job's usual note

    scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/train/scores.parquet", str(tmp_path)))
    assert dict(zip(scores["sample_id"], scores["region"])) == EXPECTED
    p = np.array([P_TRUE[i] for i in ids], dtype=np.float32).astype(np.float64)  # what the tables held
    np.testing.assert_allclose(scores["confidence"], p.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(scores["variability"], p.std(axis=1), rtol=1e-6, atol=1e-12)
    test_scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet",
                                                            str(tmp_path / "test")))
    assert "region" not in test_scores.columns

    png = client.download_artifacts(run_id, "action_scores/train/data_map.png", str(tmp_path / "png"))
    with Image.open(png) as image:
        image.load()  # decodes every pixel
        assert image.size == (650, 540)  # no wider than MLflow's artifact pane: shown unscaled
        shown = json.loads(image.text[DATA_MAP_KEY])
        assert np.asarray(image).std() > 10  # a picture, not a blank canvas
    assert shown["samples"] == shown["shown"] == 7
    assert shown["regions"] == {EASY: 3, AMBIGUOUS: 2, HARD: 2}
    assert shown["variability_cut"] == pytest.approx(np.std(np.float32([0.80, 0.85, 0.90, 0.95]).astype(np.float64)),
                                                     rel=1e-6)


def test_large_splits_are_subsampled_the_same_way_every_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    confidence, variability = rng.random(300), rng.random(300) * 0.4
    scores = pd.DataFrame({"sample_id": np.arange(300), "confidence": confidence, "variability": variability,
                           "correctness": rng.random(300), "region": assign(confidence, variability)})
    first = data_map(scores, tmp_path / "a.png", "train: data map", max_points=120)
    second = data_map(scores, tmp_path / "b.png", "train: data map", max_points=120)
    assert first.read_bytes() == second.read_bytes()
    with Image.open(first) as image:
        shown = json.loads(image.text[DATA_MAP_KEY])
    assert (shown["samples"], shown["shown"]) == (300, 120)
    assert sum(shown["regions"].values()) == 300  # counts over the whole split, not the drawn points
    with pytest.raises(ActionScoresError, match="no region"):
        data_map(scores.drop(columns="region"), tmp_path / "c.png", "x")


def _training_tables() -> dict[str, pa.Table]:
    """The 7 training samples of P_TRUE, one table per epoch, as a run holds them."""
    ids = sorted(P_TRUE)
    tables = {}
    for epoch in range(EPOCHS):
        p = [P_TRUE[i][epoch] for i in ids]
        tables[f"per_sample_losses/train/epoch_{epoch:04d}.parquet"] = _table(
            ids, [-float(np.log(x)) for x in p], target=pa.array([i % 3 for i in ids], pa.int64()),
            p_true=pa.array(p, pa.float32()), correct=pa.array([x > 0.5 for x in p]))
    return tables


def test_a_wandb_run_gets_the_data_map_as_a_scatter_chart_of_the_same_points(
        wandb_env: dict[str, str], tmp_path: Path) -> None:
    from tests.test_analyze import _make_wandb_run
    from tracking.backends import WandbTracker
    from tracking.backends.wandb_backend import OfflineRun

    folder = _make_wandb_run(tmp_path, _training_tables())
    assert analyze_run(WandbTracker(), str(folder), panels=True, progress=False).status == "done"
    run = OfflineRun(folder)
    chart = run.config["_wandb.visualize.action_scores/train/data_map"]["panel_config"]
    assert chart["panelDefId"] == "wandb/scatter/v0"
    assert chart["fieldSettings"] == {"x": "variability", "y": "confidence"}
    assert run.summary["action_scores/train/data_map_table._type"] == "table-file"
    assert run.summary["action_scores/train/data_map_table.nrows"] == len(P_TRUE)
    logged = json.loads(run.files("media")[run.summary["action_scores/train/data_map_table.path"]].read_text())
    rows = pd.DataFrame(logged["data"], columns=logged["columns"]).set_index("sample_id").sort_index()
    scores = pd.read_parquet(run.files("action_scores/train")["action_scores/train/scores.parquet"]).set_index(
        "sample_id").sort_index()
    assert rows["region"].to_dict() == EXPECTED
    np.testing.assert_allclose(rows["confidence"], scores["confidence"], rtol=1e-12)
    np.testing.assert_allclose(rows["variability"], scores["variability"], rtol=1e-12)
