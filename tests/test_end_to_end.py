"""classify -> analyze on digits against the real MLflow server, as a user runs them."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import BIN, run_command, snapshot_run
from tracking.report.panels import read_panel_rows

EPOCHS = 3
TOP_K = 10


def _tables(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> list[pd.DataFrame]:
    """The run's per-epoch tables of one split, read independently of the library, in epoch order."""
    local = Path(client.download_artifacts(run_id, f"per_sample_losses/{split}", str(dst)))
    return [pd.read_parquet(path) for path in sorted(local.glob("epoch_*.parquet"))]


def _expected_order(action: pd.Series, descending: bool) -> list[int]:
    """Sample ids sorted by action (ties by id), with plain Python sorting."""
    pairs = sorted(action.items(), key=lambda item: ((-item[1] if descending else item[1]), item[0]))
    return [int(sample_id) for sample_id, _ in pairs[:TOP_K]]


@pytest.fixture(scope="module")
def trained_run(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """One classify run on digits (train split by training pass, test by eval pass): (run id, experiment)."""
    import os

    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    experiment = f"e2e-{uuid.uuid4().hex[:8]}"
    result = run_command(
        [sys.executable, "-m", "experiments.classify", "--epochs", str(EPOCHS), "--track", "train,test",
         "--experiment", experiment, "--batch-size", "64"],
        env,
    )
    run_id = re.search(r"run (\w+) finished", result.stdout).group(1)
    return run_id, experiment


def test_classify_logs_one_table_per_split_per_epoch(mlflow_server: str, trained_run, tmp_path: Path) -> None:
    run_id, _ = trained_run
    client = mlflow.MlflowClient(mlflow_server)
    for split, size in (("train", 1437), ("test", 360)):
        names = [info.path for info in client.list_artifacts(run_id, f"per_sample_losses/{split}")]
        assert names == [f"per_sample_losses/{split}/epoch_{e:04d}.parquet" for e in range(EPOCHS)]
        for table in _tables(client, run_id, split, tmp_path):
            assert table["sample_id"].tolist() == list(range(size))
            assert table["loss"].dtype == np.float32
            assert np.isfinite(table["loss"]).all() and (table["loss"] >= 0).all()
    params = client.get_run(run_id).data.params
    assert params["action_scores.dataset"] == "digits"
    assert params["action_scores.scored_by.train"] == "train"
    assert params["action_scores.scored_by.test"] == "eval"


def test_analyze_scores_panels_and_idempotence(mlflow_server: str, trained_run, tmp_path: Path) -> None:
    run_id, _ = trained_run
    client = mlflow.MlflowClient(mlflow_server)
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": str(BIN)}
    result = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id], env)
    assert f"run {run_id}: done" in result.stdout

    assert client.get_run(run_id).data.tags["action_scores.status"] == "done"
    for split in ("train", "test"):
        tables = _tables(client, run_id, split, tmp_path / "in")
        expected = sum(t.set_index("sample_id")["loss"].astype(np.float64) for t in tables)
        local = client.download_artifacts(run_id, f"action_scores/{split}", str(tmp_path / "out"))
        scores = pd.read_parquet(Path(local) / "scores.parquet").set_index("sample_id")
        np.testing.assert_allclose(scores["action"], expected.loc[scores.index], rtol=1e-12)
        assert (scores["epochs"] == EPOCHS).all()
        assert scores["rank"].loc[_expected_order(expected, descending=True)].tolist() == list(range(1, TOP_K + 1))
        labels = tables[0].set_index("sample_id")["target"]
        assert "label_name" not in scores  # the captions' class names are the view's, never saved
        assert (scores["label"] == labels.loc[scores.index]).all()  # the recorded target, the engine's column

        hardest = read_panel_rows(Path(local) / "loss" / "hardest.png")
        easiest = read_panel_rows(Path(local) / "loss" / "easiest.png")
        assert hardest[0]["sample_ids"] == _expected_order(expected, descending=True)
        assert easiest[0]["sample_ids"] == _expected_order(expected, descending=False)
        first = hardest[0]["sample_ids"][0]
        assert f"{expected[first]:.3g}" in hardest[0]["captions"][0]
        assert [c.split("\n")[1] for c in hardest[0]["captions"]] == [str(labels[i]) for i in hardest[0]["sample_ids"]]
        per_class = sorted(p.name for p in (Path(local) / "loss" / "by_class").iterdir())
        assert per_class == [f"{digit}.png" for digit in range(10)]

    before = snapshot_run(client, run_id)
    again = run_command([str(BIN / "action-scores"), "analyze", "--run-id", run_id], env)
    assert f"run {run_id}: skipped" in again.stdout
    assert snapshot_run(client, run_id) == before


def test_cli_bad_input_is_one_clear_line(mlflow_server: str) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "PATH": str(BIN)}
    result = run_command([str(BIN / "action-scores"), "analyze", "--run-id", "0" * 32], env, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("action-scores: error: run '00000000000000000000000000000000' not found")
    both = run_command([str(BIN / "action-scores"), "analyze"], env, check=False)
    assert both.returncode == 2 and "exactly one of --run-id, --experiment, --wandb-run or --wandb-dir" in both.stderr


def test_mlflow_run_entry_points(mlflow_server: str, tmp_path: Path) -> None:
    """`mlflow run . -e classify` then `-e analyze -P run_id=...`, exactly as the README says."""
    import os

    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    experiment = f"mlproject-{uuid.uuid4().hex[:8]}"
    mlflow_cli = str(BIN / "mlflow")
    trained = run_command(
        [mlflow_cli, "run", ".", "-e", "classify", "--env-manager", "local", "--experiment-name", experiment,
         "-P", "epochs=2"],
        env,
    )
    run_id = re.search(r"Run \(ID '(\w+)'\) succeeded", trained.stderr + trained.stdout).group(1)
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(run_id).data.params["epochs"] == "2"
    run_command([mlflow_cli, "run", ".", "-e", "analyze", "--env-manager", "local", "--experiment-name", experiment,
                 "-P", f"run_id={run_id}"], env)
    run = client.get_run(run_id)
    assert run.data.tags["action_scores.status"] == "done"
    assert run.data.metrics["action_scores.test.epochs"] == 2
    names = {info.path for info in client.list_artifacts(run_id, "action_scores/test/loss")}
    assert {"action_scores/test/loss/hardest.png", "action_scores/test/loss/easiest.png"} <= names

    # The job over the experiment: the trained run is done, and the analyze job's own run has no
    # tables, so nothing is left to do; with force the trained run is redone.
    over = run_command([mlflow_cli, "run", ".", "-e", "analyze", "--env-manager", "local",
                        "--experiment-name", experiment, "-P", f"experiment={experiment}"], env)
    assert f"run {run_id}: skipped" in over.stdout
    forced = run_command([mlflow_cli, "run", ".", "-e", "analyze", "--env-manager", "local",
                          "--experiment-name", experiment, "-P", f"experiment={experiment}", "-P", "force=true"], env)
    assert f"run {run_id}: done" in forced.stdout
