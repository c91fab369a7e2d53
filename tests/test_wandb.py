"""Real W&B offline runs in a temporary WANDB_DIR: training, the post-hoc job, the report spec.

Nothing here may reach the network: W&B is offline and its base URL points at a closed
local port, so any attempted call would fail loudly.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import BIN, run_command
from tracking.report.panels import read_panel_rows
from tracking.record.recorder import LossRecorder
from tracking.backends.wandb_backend import OfflineRun, WandbTracker, _leet_records
from tracking.errors import ActionScoresError

EPOCHS = 3


def _run_folder(wandb_dir: Path, run_id: str) -> Path:
    """The oldest (training) offline folder of a run."""
    return sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}"))[0]


def _independent_action(folder: Path, split: str) -> pd.Series:
    tables = [pd.read_parquet(p) for p in sorted((folder / "files" / "per_sample_losses" / split).glob("epoch_*.parquet"))]
    return sum(t.set_index("sample_id")["loss"].astype(np.float64) for t in tables)


def test_train_analyse_offline_run(wandb_env: dict[str, str], tmp_path: Path) -> None:
    trained = run_command([sys.executable, "-m", "experiments.classify", "--epochs", str(EPOCHS),
                           "--tracker", "wandb", "--batch-size", "64"], wandb_env)
    run_id = re.search(r"run (\w+) finished", trained.stdout).group(1)
    folder = _run_folder(tmp_path, run_id)

    # Every epoch's table is in the run folder, whole, and in a versioned artifact of the same bytes.
    files = sorted((folder / "files" / "per_sample_losses" / "test").glob("*.parquet"))
    assert [f.name for f in files] == [f"epoch_{e:04d}.parquet" for e in range(EPOCHS)]
    for path in files:
        assert pd.read_parquet(path)["sample_id"].tolist() == list(range(360))
    records = _leet_records(next(folder.glob("run-*.wandb")))
    manifests = [r["artifact"] for r in records if r.get("type") == "artifact"]
    entries = {e["path"]: int(e["size"]) for m in manifests for e in m["manifest"]["contents"]}
    assert entries == {f"per_sample_losses/test/{f.name}": f.stat().st_size for f in files}
    assert {m["name"] for m in manifests} == {"per_sample_losses-test"}
    assert OfflineRun(folder).config["action_scores.dataset"] == "digits"

    analysed = run_command([str(BIN / "action-scores"), "analyze", "--wandb-dir", str(folder)], wandb_env)
    assert "done" in analysed.stdout
    run = OfflineRun(folder)
    assert run.summary["action_scores.status"] == "done"
    scores_path = run.files("action_scores/test")["action_scores/test/scores.parquet"]
    scores = pd.read_parquet(scores_path).set_index("sample_id")
    expected = _independent_action(folder, "test")
    np.testing.assert_allclose(scores["action"], expected.loc[scores.index], rtol=1e-12)
    hardest = read_panel_rows(run.files("action_scores/test/loss")["action_scores/test/loss/hardest.png"])
    assert hardest[0]["sample_ids"] == [int(i) for i in expected.sort_values(ascending=False, kind="stable").index[:10]]
    # W&B-native views: captioned images and a table of the hardest samples.
    assert run.summary["action_scores/test/loss/hardest/images.count"] == 10
    assert run.summary["action_scores/test/loss/hardest/table._type"] == "table-file"
    captions = run.summary["action_scores/test/loss/hardest/images.captions"]
    assert captions[0] == hardest[0]["captions"][0]

    again = run_command([str(BIN / "action-scores"), "analyze", "--wandb-dir", str(folder)], wandb_env)
    assert "skipped" in again.stdout

    spec_path = tmp_path / "report.json"
    report = run_command([str(BIN / "action-scores"), "report", str(folder), "--out", str(spec_path)], wandb_env)
    assert "publishing needs a W&B server" in report.stdout
    spec = json.loads(spec_path.read_text())
    grids = [b for b in spec["blocks"] if b["type"] == "panel_grid"]
    assert {g["media_browser"] for g in grids} >= {"action_scores/test/loss/hardest/images",
                                                   "action_scores/test/loss/easiest/images"}
    assert spec["runs"] == [{"id": run_id, "name": run_id}]


def test_both_trackers_give_identical_scores(wandb_env: dict[str, str], mlflow_server: str, tmp_path: Path) -> None:
    env = dict(wandb_env, MLFLOW_TRACKING_URI=mlflow_server)
    trained = run_command([sys.executable, "-m", "experiments.classify", "--epochs", "2", "--tracker", "both",
                           "--batch-size", "64", "--experiment", f"both-{uuid.uuid4().hex[:6]}"], env)
    mlflow_id = re.search(r"run (\w+) finished", trained.stdout).group(1)
    client = mlflow.MlflowClient(mlflow_server)
    wandb_id = client.get_run(mlflow_id).data.tags.get("action_scores.wandb_run_id")
    folder = _run_folder(tmp_path, wandb_id)
    run_command([str(BIN / "action-scores"), "analyze", "--run-id", mlflow_id], env)
    run_command([str(BIN / "action-scores"), "analyze", "--wandb-dir", str(folder)], env)
    from_mlflow = pd.read_parquet(client.download_artifacts(mlflow_id, "action_scores/test/scores.parquet",
                                                            str(tmp_path)))
    from_wandb = pd.read_parquet(OfflineRun(folder).files("action_scores/test")["action_scores/test/scores.parquet"])
    pd.testing.assert_frame_equal(from_mlflow, from_wandb)


def test_table_over_wandb_row_limits_survives_whole(wandb_env: dict[str, str], tmp_path: Path) -> None:
    """W&B cuts a wandb.Table at 10,000 rows in the UI; the parquet route keeps all 25,000."""
    samples = 25_000
    tracker = WandbTracker()
    run_id = tracker.start()
    recorder = LossRecorder("train", samples, tracker, local_dir=tmp_path / "local")
    losses = torch.rand(samples)
    for start in range(0, samples, 4096):
        recorder.update(torch.arange(start, min(start + 4096, samples)), losses[start:start + 4096])
    recorder.end_epoch(0)
    tracker.finish()
    tracker.attach(str(_run_folder(tmp_path, run_id)))
    local = tracker.download("per_sample_losses/train/epoch_0000.parquet", tmp_path / "back")
    table = pd.read_parquet(local)
    assert len(table) == samples
    np.testing.assert_array_equal(table["loss"].to_numpy(), losses.numpy())


def test_offline_attach_errors_are_clear(wandb_env: dict[str, str], tmp_path: Path) -> None:
    tracker = WandbTracker()
    with pytest.raises(ActionScoresError, match=r"W&B run 'entity/project/abc123' not found: no such offline run "
                                                 r"folder, nor a run of that id under .*, and W&B is offline"):
        tracker.attach("entity/project/abc123")
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(ActionScoresError, match="is not a W&B offline run folder"):
        tracker.attach(str(tmp_path / "not-a-run"))


def test_offline_folder_copied_under_another_name_is_read(wandb_env: dict[str, str], tmp_path: Path) -> None:
    """A run folder copied or renamed (no longer `offline-run-<time>-<id>`) is still the run it holds."""
    import shutil

    tracker = WandbTracker()
    run_id = tracker.start()
    recorder = LossRecorder("test", 5, tracker, local_dir=tmp_path / "local")
    recorder.update(torch.arange(5), torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5]))
    recorder.end_epoch(0)
    tracker.finish()
    copy = shutil.copytree(_run_folder(tmp_path, run_id), tmp_path / "elsewhere" / "my-run")
    tracker.attach(str(copy))
    assert tracker.run_id == run_id
    table = pd.read_parquet(tracker.download("per_sample_losses/test/epoch_0000.parquet", tmp_path / "back"))
    assert table["loss"].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
