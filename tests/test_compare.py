"""`action-scores compare` over real analysed digits runs on the real MLflow server, and the per-class
distribution plot the job logs for classification splits."""

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
from scipy.stats import spearmanr

from experiments.classify import main as classify
from tests.conftest import BIN, in_process_training, run_command
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.compare import compare_runs
from tracking.errors import ActionScoresError
from tracking.report.panels import read_panel_rows

TOP_K = 30


@pytest.fixture(scope="module")
def analysed_runs(mlflow_server: str) -> tuple[str, list[str]]:
    """Three 2-epoch digits runs (seeds 0, 1, 2; test split by eval pass), analysed: (experiment, run ids)."""
    experiment = f"compare-{uuid.uuid4().hex[:8]}"
    run_ids = []
    with in_process_training(mlflow_server):
        for seed in range(3):
            classify(["--epochs", "2", "--seed", str(seed), "--experiment", experiment])
            run_id = mlflow.last_active_run().info.run_id
            analyze_run(MLflowTracker(mlflow_server), run_id, panels=seed == 0)
            run_ids.append(run_id)
    return experiment, run_ids


def _actions(client: mlflow.MlflowClient, run_ids: list[str], dst: Path) -> pd.DataFrame:
    return pd.DataFrame({
        run_id: pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet",
                                                          str(dst / run_id))).set_index("sample_id")["action"]
        for run_id in run_ids
    })


def test_compare_logs_correlation_overlap_and_mean_rank_to_a_new_run(
        mlflow_server: str, analysed_runs: tuple[str, list[str]], tmp_path: Path) -> None:
    experiment, run_ids = analysed_runs
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    result = run_command([str(BIN / "action-scores"), "compare", *run_ids, "--top-k", str(TOP_K),
                          "--experiment", experiment], env)
    new_run = re.search(r"logged to run (\w+)", result.stdout).group(1)
    assert new_run not in run_ids
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(new_run)
    assert run.data.tags["action_scores.compare.sources"] == ",".join(run_ids)
    assert [run.data.tags[f"action_scores.compare.source.{i}"] for i in range(3)] == run_ids
    assert run.data.params["split"] == "test"

    actions = _actions(client, run_ids, tmp_path / "in")
    folder = Path(client.download_artifacts(new_run, "action_scores_compare/test", str(tmp_path / "out")))
    assert sorted(p.name for p in folder.iterdir()) == ["combined.parquet", "heatmap.png", "spearman.csv",
                                                         "top_k_overlap.csv"]
    correlation = pd.read_csv(folder / "spearman.csv", index_col=0)
    overlap = pd.read_csv(folder / "top_k_overlap.csv", index_col=0)
    for a in run_ids:
        for b in run_ids:
            assert correlation.loc[a, b] == pytest.approx(spearmanr(actions[a], actions[b]).statistic, abs=1e-12)
            top = {r: set(actions[r].sort_values(ascending=False, kind="stable").index[:TOP_K]) for r in (a, b)}
            assert overlap.loc[a, b] == pytest.approx(len(top[a] & top[b]) / TOP_K)
    off = correlation.to_numpy()[~np.eye(3, dtype=bool)]
    assert 0.2 < off.min() < 1.0  # seeds agree on what is hard, but not exactly
    assert run.data.metrics["spearman_mean"] == pytest.approx(off.mean())

    combined = pd.read_parquet(folder / "combined.parquet").set_index("sample_id")
    ranks = actions.rank(ascending=False, method="first")
    np.testing.assert_allclose(combined["mean_rank"], ranks.mean(axis=1).reindex(combined.index), rtol=1e-12)
    hardest = combined["mean_rank"].idxmin()
    assert combined.loc[hardest, "rank"] == 1
    assert sorted(combined["rank"]) == list(range(1, len(actions) + 1))
    with Image.open(folder / "heatmap.png") as image:
        assert image.width > image.height > 300


def test_compare_refuses_unanalysed_runs_and_a_single_run(mlflow_server: str,
                                                          analysed_runs: tuple[str, list[str]]) -> None:
    _, run_ids = analysed_runs
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": str(BIN)}
    client = mlflow.MlflowClient(mlflow_server)
    bare = client.create_run(client.create_experiment(f"bare-{uuid.uuid4().hex[:8]}")).info.run_id
    refused = run_command([str(BIN / "action-scores"), "compare", run_ids[0], bare], env, check=False)
    assert refused.returncode == 2
    assert f"runs [{bare}] have no action_scores/<split>/scores.parquet" in refused.stderr
    alone = run_command([str(BIN / "action-scores"), "compare", run_ids[0]], env, check=False)
    assert alone.returncode == 2 and "compare needs at least two different runs" in alone.stderr


def test_analyze_logs_the_action_distribution_per_class(mlflow_server: str, analysed_runs: tuple[str, list[str]],
                                                        tmp_path: Path) -> None:
    _, run_ids = analysed_runs
    client = mlflow.MlflowClient(mlflow_server)
    names = {info.path for info in client.list_artifacts(run_ids[0], "action_scores/test/loss")}
    assert "action_scores/test/loss/by_class_distribution.png" in names
    local = client.download_artifacts(run_ids[0], "action_scores/test/loss/by_class_distribution.png", str(tmp_path))
    with Image.open(local) as image:
        assert image.format == "PNG" and image.width >= 600  # ten boxes, one per digit class
    # The run analysed without panels has none: the plot travels with the panels.
    assert not client.list_artifacts(run_ids[1], "action_scores/test/loss")


def test_mlflow_run_compare_entry_point(mlflow_server: str, analysed_runs: tuple[str, list[str]]) -> None:
    """`mlflow run . -e compare -P run_ids=a,b`, as the README says: the launched run is the new run."""
    experiment, run_ids = analysed_runs
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    result = run_command([str(BIN / "mlflow"), "run", ".", "-e", "compare", "--env-manager", "local",
                          "--experiment-name", experiment, "-P", f"run_ids={run_ids[0]},{run_ids[2]}",
                          "-P", "top_k=20"], env)
    new_run = re.search(r"logged to run (\w+)", result.stdout).group(1)
    run = mlflow.MlflowClient(mlflow_server).get_run(new_run)
    assert run.data.tags["action_scores.compare.sources"] == f"{run_ids[0]},{run_ids[2]}"
    assert run.data.params["top_k"] in ("20", "20.0") and "spearman_mean" in run.data.metrics


def _in_order(scores: pd.DataFrame, column: str, lowest_first: bool, k: int) -> list[int]:
    """Sample ids by `column` (ties by ascending id), with a plain Python sort."""
    pairs = zip(scores["sample_id"].tolist(), scores[column].tolist())
    return [i for i, _ in sorted(pairs, key=lambda p: (p[1] if lowest_first else -p[1], p[0]))[:k]]


def test_analyze_draws_every_score_in_its_own_direction(mlflow_server: str, analysed_runs: tuple[str, list[str]],
                                                        tmp_path: Path) -> None:
    """The hardest by aum, confidence and correctness are the lowest; by forgetting, el2n, variability the highest."""
    _, run_ids = analysed_runs
    client = mlflow.MlflowClient(mlflow_server)
    local = Path(client.download_artifacts(run_ids[0], "action_scores/test", str(tmp_path)))
    scores = pd.read_parquet(local / "scores.parquet")
    folders = sorted(p.name for p in local.iterdir() if p.is_dir())
    assert folders == ["aum", "confidence", "correctness", "el2n", "forgetting", "loss", "variability"]
    for score, lowest_is_hardest in [("aum", True), ("confidence", True), ("correctness", True), ("forgetting", False),
                                     ("el2n", False), ("variability", False)]:
        hardest = read_panel_rows(local / score / "hardest.png")[0]
        easiest = read_panel_rows(local / score / "easiest.png")[0]
        assert hardest["sample_ids"] == _in_order(scores, score, lowest_is_hardest, 10), score
        assert easiest["sample_ids"] == _in_order(scores, score, not lowest_is_hardest, 10), score
        assert hardest["captions"][0].startswith(f"{score} ")
        assert not (local / score / "by_class").exists()  # per-class panels for the loss objectives only
    assert scores["aum"].min() < 0  # the lowest-AUM panel shows samples the model puts in another class
    assert (local / "loss" / "by_class").is_dir()


def test_compare_ranks_a_lower_is_harder_score_lowest_first(mlflow_server: str,
                                                            analysed_runs: tuple[str, list[str]]) -> None:
    experiment, run_ids = analysed_runs
    client = mlflow.MlflowClient(mlflow_server)
    result = compare_runs(MLflowTracker(mlflow_server), run_ids[:2], top_k=TOP_K, experiment=experiment, score="aum")
    assert result.score == "aum" and client.get_run(result.run_id).data.params["score"] == "aum"
    aum = pd.DataFrame({
        run_id: pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet")
                                ).set_index("sample_id")["aum"] for run_id in run_ids[:2]})
    a, b = run_ids[:2]
    lowest = {r: set(aum[r].sort_values(kind="stable").index[:TOP_K]) for r in (a, b)}
    assert result.overlap.loc[a, b] == pytest.approx(len(lowest[a] & lowest[b]) / TOP_K)
    combined = result.combined.set_index("sample_id")
    ranks = aum.rank(ascending=True, method="first")  # 1 = lowest aum = hardest
    np.testing.assert_allclose(combined["mean_rank"], ranks.mean(axis=1).reindex(combined.index), rtol=1e-12)
    assert combined.loc[combined["mean_rank"].idxmin(), "rank"] == 1
    with pytest.raises(ActionScoresError, match=r"unknown score 'margin'; valid scores: action, mean_loss"):
        compare_runs(MLflowTracker(mlflow_server), run_ids[:2], score="margin")
