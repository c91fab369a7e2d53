"""Selections: the right samples in the right order, logged to the run, and retraining without or relabelled.

Pure checks on hand-made scores tables, then the whole path as a user runs it against the session's
real MLflow server (classify -> analyze -> select -> classify --exclude / --relabel) and W&B offline.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import BIN, in_process_training, run_command
from tracking.errors import ActionScoresError
from tracking.scoring.registry import SCORES
from tracking.selection import (choices, choose, most_frequent_prediction, next_number, selection_number,
                                suggested_labels)

EPOCHS = 2
N = 40


def _hand_made() -> pd.DataFrame:
    """A scores table with every registered score, ids shuffled, values with ties."""
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(100, 100 + N))
    table = pd.DataFrame({"sample_id": ids})
    for name in SCORES:
        table[name] = rng.integers(0, 8, N).astype(float)  # few values: many ties, broken by sample id
    table["fused"] = rng.random(N)
    return table


def _numpy_order(table: pd.DataFrame, column: str, higher_is_harder: bool) -> list[int]:
    """Ids hardest first, ties by lower id, with numpy's lexsort (independent of tracking.scoring.rank)."""
    values = table[column].to_numpy()
    key = -values if higher_is_harder else values
    return table["sample_id"].to_numpy()[np.lexsort((table["sample_id"].to_numpy(), key))].tolist()


@pytest.mark.parametrize("by", choices())
def test_fraction_takes_the_hard_end_of_every_score(by: str) -> None:
    table = _hand_made()
    harder = True if by == "fused" else SCORES[by].higher_is_harder
    chosen = choose(table, by, fraction=0.25)
    assert chosen["sample_id"].tolist() == _numpy_order(table, by, harder)[:10]
    assert chosen["rank"].tolist() == list(range(1, 11))
    assert chosen[by].tolist() == table.set_index("sample_id").loc[chosen["sample_id"], by].tolist()


def test_threshold_takes_every_sample_at_least_as_hard() -> None:
    table = _hand_made()
    high = choose(table, "action", threshold=5.0)  # higher = harder: action >= 5
    assert sorted(high["sample_id"]) == sorted(table.loc[table["action"] >= 5, "sample_id"])
    assert high["sample_id"].tolist() == _numpy_order(table, "action", True)[:len(high)]
    low = choose(table, "aum", threshold=2.0)  # lower = harder: aum <= 2
    assert sorted(low["sample_id"]) == sorted(table.loc[table["aum"] <= 2, "sample_id"])
    assert low["sample_id"].tolist() == _numpy_order(table, "aum", False)[:len(low)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"by": "loudness", "fraction": 0.1}, "unknown score 'loudness' to select by; valid: action, mean_loss"),
    ({"by": "aum", "fraction": 0.0}, "fraction must be in (0, 1]"),
    ({"by": "aum", "fraction": 1.5}, "fraction must be in (0, 1]"),
    ({"by": "aum"}, "give exactly one of --fraction"),
    ({"by": "aum", "fraction": 0.1, "threshold": 1.0}, "give exactly one of --fraction"),
    ({"by": "aum", "threshold": float("nan")}, "threshold must be a finite number"),
    ({"by": "aum", "threshold": -5.0}, "no sample is at least as hard as -5.0 by aum (lower = harder"),
])
def test_bad_requests_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ActionScoresError) as error:
        choose(_hand_made(), **kwargs)
    assert message in str(error.value)


def test_a_score_the_table_lacks_is_named() -> None:
    with pytest.raises(ActionScoresError, match="the scores table has no 'el2n'"):
        choose(_hand_made().drop(columns="el2n"), "el2n", fraction=0.1)


def test_most_frequent_prediction_and_suggested_labels() -> None:
    rng = np.random.default_rng(0)
    ids = np.arange(50)
    epochs = [pd.DataFrame({"sample_id": rng.permutation(ids)}) for _ in range(5)]
    for table in epochs:
        table["prediction"] = rng.integers(0, 4, len(ids))
    mode = most_frequent_prediction(epochs)
    for sample_id in ids:
        counts = Counter(int(t.set_index("sample_id").loc[sample_id, "prediction"]) for t in epochs)
        top = max(counts.values())
        assert mode[sample_id] == min(c for c, n in counts.items() if n == top)  # ties: the lowest class
    labels = pd.Series(rng.integers(0, 4, len(ids)), index=ids)
    out = suggested_labels(pd.DataFrame({"sample_id": ids[::-1]}), labels, mode)
    for row in out.itertuples():
        assert row.label == labels[row.sample_id]
        assert pd.isna(row.suggested_label) == (mode[row.sample_id] == labels[row.sample_id])
        if not pd.isna(row.suggested_label):
            assert row.suggested_label == mode[row.sample_id]


def _train(uri: str, experiment: str, *extra: str) -> str:
    """One 2-epoch digits run in this process (train by the training pass, test by an eval pass): its id."""
    from experiments.classify import main as classify

    with in_process_training(uri):
        classify(["--epochs", str(EPOCHS), "--track", "train,test", "--experiment", experiment, "--batch-size", "128",
                  *extra])
    # Asked of the server, not of mlflow's process-wide last_active_run: an earlier test of the session
    # may have left that pointing at a run of another server.
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id


def _tables(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> list[pd.DataFrame]:
    local = Path(client.download_artifacts(run_id, f"per_sample_losses/{split}", str(dst)))
    return [pd.read_parquet(path) for path in sorted(local.glob("epoch_*.parquet"))]


def _select(uri: str, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`action-scores select` in this process: (exit code, stdout, stderr)."""
    from tracking.cli import main

    capsys.readouterr()
    code = main(["select", "--tracking-uri", uri, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_select_exclude_and_relabel_on_mlflow(tracking_env: dict[str, str], mlflow_server: str,
                                              client: mlflow.MlflowClient, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from tracking.analyze import analyze_run
    from tracking.backends import MLflowTracker

    experiment = f"select-{uuid.uuid4().hex[:8]}"
    source = _train(mlflow_server, experiment)
    options = ["--run-id", source, "--split", "train"]
    code, _, err = _select(mlflow_server, capsys, *options, "--by", "aum", "--fraction", "0.05")
    assert code == 2
    assert f"action-scores: error: run {source} is not analysed" in err
    assert "action-scores analyze --run-id" in err
    analyze_run(MLflowTracker(mlflow_server), source, panels=False)
    code, _, err = _select(mlflow_server, capsys, *options, "--by", "aum", "--fraction", "2")
    assert code == 2 and "fraction must be in (0, 1]" in err
    result = run_command([str(BIN / "action-scores"), "select", *options, "--by", "aum", "--fraction", "0.05"],
                         tracking_env)  # the console script, as a user runs it
    assert "selected 72 of 1437 samples of split 'train' by aum (lower = harder)" in result.stdout

    # The parquet: the 72 lowest aum, lowest first, against numpy on the run's own scores and tables.
    scores = pd.read_parquet(client.download_artifacts(source, "action_scores/train/scores.parquet", str(tmp_path)))
    path = "action_scores/train/selections/selection_0001.parquet"
    selection = pd.read_parquet(client.download_artifacts(source, path, str(tmp_path)))
    assert list(selection.columns) == ["sample_id", "aum", "rank", "label", "suggested_label"]
    assert selection["sample_id"].tolist() == _numpy_order(scores, "aum", False)[:72]
    assert selection["rank"].tolist() == list(range(1, 73))
    tables = _tables(client, source, "train", tmp_path / "source")
    votes = np.stack([t.set_index("sample_id").loc[selection["sample_id"], "prediction"] for t in tables])
    labels = tables[0].set_index("sample_id").loc[selection["sample_id"], "target"].to_numpy()
    assert (selection["label"].to_numpy() == labels).all()
    for column, sample_label, suggestion in zip(votes.T, labels, selection["suggested_label"]):
        mode = Counter(column.tolist()).most_common()
        best = min(c for c, n in mode if n == mode[0][1])
        assert pd.isna(suggestion) if best == sample_label else suggestion == best
    relabelled = selection.dropna(subset=["suggested_label"])
    assert len(relabelled) > 0  # two epochs leave plenty of the lowest-aum samples mispredicted

    run = client.get_run(source)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "train-aum-selection_0001"
    assert {(t.key, t.value) for t in inputs[0].tags} >= {("mlflow.data.context", "selection")}
    assert inputs[0].dataset.source_type == "run_artifact"
    assert json.loads(inputs[0].dataset.source) == {"uri": f"runs:/{source}/{path}"}
    assert run.data.tags["action_scores.selection.latest.train"] == path
    code, out, _ = _select(mlflow_server, capsys, *options, "--by", "fused", "--threshold", "0.5")
    assert code == 0 and "by fused (higher = harder)" in out
    assert client.get_run(source).data.tags["action_scores.selection.latest.train"].endswith("selection_0002.parquet")
    assert _select(mlflow_server, capsys, *options, "--by", "aum", "--fraction", "0.05")[0] == 0  # 0003: the latest

    # --exclude: exactly the selected ids are absent from the new run's train tables; test is untouched.
    excluded = _train(mlflow_server, experiment, "--exclude", source)
    for table in _tables(client, excluded, "train", tmp_path / "excluded"):
        assert table["sample_id"].tolist() == sorted(set(range(1437)) - set(selection["sample_id"]))
    for table in _tables(client, excluded, "test", tmp_path / "excluded-test"):
        assert table["sample_id"].tolist() == list(range(360))
    tags = client.get_run(excluded).data.tags
    assert tags["action_scores.selection.exclude.run"] == source
    assert tags["action_scores.selection.exclude.file"] == "action_scores/train/selections/selection_0003.parquet"
    assert tags["action_scores.selection.exclude.samples"] == "72"

    # --relabel: exactly the suggested labels change; every id stays.
    relabel = _train(mlflow_server, experiment, "--relabel", source)
    table = _tables(client, relabel, "train", tmp_path / "relabel")[0].set_index("sample_id")
    original = tables[0].set_index("sample_id")["target"]
    changed = table.index[table["target"] != original.loc[table.index]]
    assert sorted(changed) == sorted(relabelled["sample_id"])
    assert (table.loc[relabelled["sample_id"], "target"].to_numpy() == relabelled["suggested_label"].to_numpy()).all()
    assert client.get_run(relabel).data.tags["action_scores.selection.relabel.run"] == source

    # A run without a selection of the split is named, with the command that makes one; no run is started.
    runs_before = len(client.search_runs([run.info.experiment_id]))
    with pytest.raises(ActionScoresError) as error:
        _train(mlflow_server, experiment, "--exclude", excluded)
    assert f"run {excluded} has no selection of split 'train'" in str(error.value)
    assert f"action-scores select --run-id {excluded} --split train" in str(error.value)
    assert len(client.search_runs([run.info.experiment_id])) == runs_before


def test_select_on_a_wandb_offline_run(wandb_env: dict[str, str], tmp_path: Path) -> None:
    from tracking.backends import WandbTracker
    from tracking.selection import latest_selection

    result = run_command([sys.executable, "-m", "experiments.classify", "--epochs", "1", "--track", "train",
                          "--tracker", "wandb", "--batch-size", "128"], wandb_env)
    run_id = re.search(r"run (\w+) finished", result.stdout).group(1)
    folder = next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    run_command([str(BIN / "action-scores"), "analyze", "--wandb-dir", str(folder), "--no-panels"], wandb_env)
    selected = run_command([str(BIN / "action-scores"), "select", "--run-id", str(folder), "--by", "confidence",
                            "--fraction", "0.01"], wandb_env)
    assert "selected 14 of 1437 samples of split 'train' by confidence (lower = harder)" in selected.stdout
    tracker = WandbTracker()
    path, table = latest_selection(tracker, str(folder), "train")
    assert path == "action_scores/train/selections/selection_0001.parquet"
    tracker.attach(str(folder))
    scores = pd.read_parquet(tracker.download("action_scores/train/scores.parquet", tmp_path / "scores"))
    assert table["sample_id"].tolist() == _numpy_order(scores, "confidence", False)[:14]
    manifests = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert any(b"train-confidence-selection_0001" in m.read_bytes() for m in manifests)  # the dataset artifact


def test_selections_are_numbered_and_ordered_by_value_not_by_text() -> None:
    paths = ["a/selections/selection_9999.parquet", "a/selections/selection_10000.parquet",
             "a/selections/selection_0002.parquet", "a/selections/selection_x.parquet", "a/selections/notes.txt"]
    assert [selection_number(p) for p in paths] == [9999, 10000, 2, None, None]
    assert next_number(paths) == 10001  # text order would take 9999 as the highest and reuse 10000
    assert sorted((p for p in paths if selection_number(p) is not None), key=selection_number)[-1].endswith("10000.parquet")
    assert next_number([]) == 1
