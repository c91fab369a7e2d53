"""The post-hoc job on hand-made runs of the real MLflow server: good runs, idempotence, and bad
inputs that must raise a clear ActionScoresError and leave the run exactly as it was."""

from __future__ import annotations

import os
import pickle
import re
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import snapshot_run
from tracking.analyze import analyze_experiment, analyze_run
from tracking.errors import ActionScoresError
from tracking.backends import MLflowTracker

METRICS = ("samples", "epochs", "action_mean", "action_max", "action_min")


def _table(ids, losses, **extra) -> pa.Table:
    return pa.table({"sample_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float32()), **extra})


def _make_run(
    client: mlflow.MlflowClient,
    experiment_id: str,
    tmp: Path,
    files: dict[str, pa.Table | bytes],
    status: str = "FINISHED",
) -> str:
    """A run holding `files` (artifact path -> table or raw bytes), terminated with `status`."""
    run_id = client.create_run(experiment_id).info.run_id
    root = tmp / uuid.uuid4().hex
    for artifact_path, content in files.items():
        local = root / artifact_path
        local.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            local.write_bytes(content)
        else:
            pq.write_table(content, local)
    client.log_artifacts(run_id, str(root))  # one upload per file, keeping the layout
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def _make_wandb_run(tmp: Path, files: dict[str, pa.Table]) -> Path:
    """A finished W&B offline run (under $WANDB_DIR) holding `files` (artifact path -> table); its folder."""
    from tracking.backends import WandbTracker

    tracker = WandbTracker()
    tracker.start()
    root = tmp / uuid.uuid4().hex
    for artifact_path, table in files.items():
        local = root / artifact_path
        local.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, local)
        tracker.write_artifact(local, artifact_path.rsplit("/", 1)[0])
    folder = tracker.offline_folder
    tracker.finish()
    return folder


def _random_epochs(seed: int, n: int, epochs: int, split: str = "test") -> tuple[dict[str, pa.Table], np.ndarray, np.ndarray]:
    """Shuffled per-epoch tables with a target column; returns (files, losses[epoch, id], targets[id])."""
    rng = np.random.default_rng(seed)
    losses = (rng.random((epochs, n)) * 3).astype(np.float32)
    targets = rng.integers(0, 5, size=n)
    files = {}
    for epoch in range(epochs):
        order = rng.permutation(n)
        files[f"per_sample_losses/{split}/epoch_{epoch:04d}.parquet"] = _table(
            order, losses[epoch, order], target=pa.array(targets[order], pa.int64())
        )
    return files, losses, targets


def _good_files(n: int = 6, epochs: int = 3, split: str = "test") -> dict[str, pa.Table]:
    return {
        f"per_sample_losses/{split}/epoch_{e:04d}.parquet": _table(list(range(n)), [float(e + i) for i in range(n)])
        for e in range(epochs)
    }


def _scores(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> pd.DataFrame:
    local = client.download_artifacts(run_id, f"action_scores/{split}/scores.parquet", str(dst))
    return pd.read_parquet(local)


def _check_scores(scores: pd.DataFrame, losses: np.ndarray, targets: np.ndarray) -> None:
    """Against plain Python sums over epochs and a plain Python sort."""
    epochs, n = losses.shape
    action = {i: sum(float(losses[e, i]) for e in range(epochs)) for i in range(n)}
    assert scores["sample_id"].tolist() == list(range(n))
    assert scores["epochs"].tolist() == [epochs] * n
    assert scores["action"].tolist() == pytest.approx([action[i] for i in range(n)], rel=1e-12)
    assert scores["mean_loss"].tolist() == pytest.approx([action[i] / epochs for i in range(n)], rel=1e-12)
    order = sorted(action, key=lambda i: (-action[i], i))
    assert scores["rank"].tolist() == [order.index(i) + 1 for i in range(n)]
    assert scores["label"].tolist() == targets.tolist()


def _metric_lengths(client: mlflow.MlflowClient, run_id: str) -> dict[str, int]:
    keys = client.get_run(run_id).data.metrics
    return {key: len(client.get_metric_history(run_id, key)) for key in keys}


# --- (a) a good run ---------------------------------------------------------------------


def test_good_run_is_scored_then_skipped_then_redone_with_force(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    files, losses, targets = _random_epochs(seed=3, n=20, epochs=4)
    run_id = _make_run(client, experiment_id, tmp_path, files)

    result = analyze_run(tracker, run_id, panels=False)
    assert (result.run_id, result.status) == (run_id, "done")
    assert result.samples == {"test": 20} and result.epochs == {"test": 4}
    assert result.panels == []

    before = snapshot_run(client, run_id)
    assert before["tags"]["action_scores.status"] == "done"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(before["files"]) == sorted([*files, "action_scores/test/scores.parquet"])
    scores = _scores(client, run_id, "test", tmp_path / "scores1")
    _check_scores(scores, losses, targets)
    action = losses.astype(np.float64).sum(axis=0)
    metrics = before["metrics"]  # key -> [(step, value)]: one entry each
    assert set(metrics) == {f"action_scores.test.{m}" for m in METRICS}
    assert metrics["action_scores.test.samples"] == [(0, 20.0)]
    assert metrics["action_scores.test.epochs"] == [(0, 4.0)]
    assert metrics["action_scores.test.action_mean"] == [(0, pytest.approx(action.mean(), rel=1e-12))]
    assert metrics["action_scores.test.action_max"] == [(0, pytest.approx(action.max(), rel=1e-12))]
    assert metrics["action_scores.test.action_min"] == [(0, pytest.approx(action.min(), rel=1e-12))]

    again = analyze_run(tracker, run_id, panels=False)
    assert (again.status, again.samples, again.epochs) == ("skipped", {}, {})
    assert "already analysed" in again.message
    assert snapshot_run(client, run_id) == before  # same files and bytes, tags, params, metric histories

    redone = analyze_run(tracker, run_id, panels=False, force=True)
    assert (redone.status, redone.samples, redone.epochs) == ("done", {"test": 20}, {"test": 4})
    assert _metric_lengths(client, run_id) == {f"action_scores.test.{m}": 2 for m in METRICS}
    assert client.get_run(run_id).data.tags["action_scores.status"] == "done"
    _check_scores(_scores(client, run_id, "test", tmp_path / "scores2"), losses, targets)


def test_loss_parts_get_their_own_actions(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    loc = np.array([[1.0, 2.0, 0.5], [0.25, 4.0, 1.0]], dtype=np.float32)
    cls = np.array([[0.5, 0.5, 2.0], [1.0, 0.0, 3.0]], dtype=np.float32)
    files = {
        f"per_sample_losses/val/epoch_{e:04d}.parquet": pa.table({
            "sample_id": [2, 0, 1],
            "loss": pa.array((loc[e] + cls[e])[[2, 0, 1]], pa.float32()),
            "loss_loc": pa.array(loc[e][[2, 0, 1]], pa.float32()),
            "loss_cls": pa.array(cls[e][[2, 0, 1]], pa.float32()),
        })
        for e in range(2)
    }
    run_id = _make_run(client, experiment_id, tmp_path, files)
    assert analyze_run(tracker, run_id, panels=False).status == "done"
    scores = _scores(client, run_id, "val", tmp_path / "s")
    assert scores["sample_id"].tolist() == [0, 1, 2]
    assert scores["action_loc"].tolist() == [1.25, 6.0, 1.5]
    assert scores["action_cls"].tolist() == [1.5, 0.5, 5.0]
    assert scores["action"].tolist() == [2.75, 6.5, 6.5]
    assert scores["rank"].tolist() == [3, 1, 2]  # tie 6.5: lower sample_id first
    assert "label" not in scores.columns


def test_two_splits_are_scored_from_their_own_tables(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    train, train_losses, train_targets = _random_epochs(seed=11, n=8, epochs=3, split="train")
    test, test_losses, test_targets = _random_epochs(seed=12, n=5, epochs=3, split="test")
    run_id = _make_run(client, experiment_id, tmp_path, {**train, **test})
    result = analyze_run(tracker, run_id, panels=False)
    assert result.samples == {"train": 8, "test": 5}
    _check_scores(_scores(client, run_id, "train", tmp_path / "a"), train_losses, train_targets)
    _check_scores(_scores(client, run_id, "test", tmp_path / "b"), test_losses, test_targets)


# --- (b) bad inputs leave the run unchanged -----------------------------------------------


def test_unknown_run_id_is_named(tracker: MLflowTracker, mlflow_server: str) -> None:
    unknown = "feedfacefeedfacefeedfacefeedface"
    with pytest.raises(ActionScoresError, match=rf"run '{unknown}' not found at tracking URI {mlflow_server}"):
        analyze_run(tracker, unknown, panels=False)


def _nan_inf_files() -> dict[str, pa.Table]:
    files = _good_files(n=6, epochs=3)
    files["per_sample_losses/test/epoch_0001.parquet"] = _table([0, 1, 2, 3, 4, 5], [1, 1, float("nan"), 1, 1, 1])
    files["per_sample_losses/test/epoch_0002.parquet"] = _table([5, 4, 3, 2, 1, 0], [float("inf"), 1, 1, 1, 1, float("-inf")])
    return files


def _files_with(**replacements: pa.Table | bytes) -> dict[str, pa.Table | bytes]:
    files: dict[str, pa.Table | bytes] = dict(_good_files(n=6, epochs=3))
    for name, content in replacements.items():
        files[f"per_sample_losses/test/{name}.parquet"] = content
    return files


BAD_RUNS = {
    "no per-sample tables": (
        {"notes/readme.txt": b"just a model\n"},
        r"run \w+ has no per-sample tables under per_sample_losses/<split>/epoch_EEEE\.parquet",
    ),
    "only non-parquet files in the split folder": (
        {"per_sample_losses/test/README.txt": b"tables come later\n"},
        r"run \w+ has no per-sample tables",
    ),
    "missing epoch": (
        {k: v for k, v in _good_files(n=6, epochs=4).items() if "epoch_0002" not in k},
        r"split 'test': epoch tables missing: \[epoch_0002\.parquet\] \(found 3 of epochs 0\.\.3\)",
    ),
    "ids differ between epochs": (
        _files_with(epoch_0002=_table([0, 1, 2, 3, 9, 5], [1.0] * 6)),
        r"per_sample_losses/test/epoch_0002\.parquet: sample ids differ from epoch 0 of split 'test': "
        r"missing \[4\], unexpected \[9\]",
    ),
    "nan and inf losses": (
        _nan_inf_files(),
        r"split 'test' has NaN or infinite losses, which would corrupt the sums: "
        r"epoch 1: samples \[2\]; epoch 2: samples \[0, 5\]",
    ),
    "corrupt parquet": (
        _files_with(epoch_0001=b"PAR1\x00\x01 definitely not parquet PAR1"),
        r"per_sample_losses/test/epoch_0001\.parquet is not a readable parquet file",
    ),
    "badly named parquet": (
        _files_with(epoch_3=_table([0, 1, 2, 3, 4, 5], [1.0] * 6)),
        r"per_sample_losses/test/epoch_3\.parquet: not named epoch_EEEE\.parquet",
    ),
}


class Payload:
    """Pickled, it would create `marker` when unpickled: the proof that nothing is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


# Cases that need the test's folder build their files from it.
BAD_RUNS |= {
    "sample ids as strings": (
        lambda tmp: _files_with(epoch_0001=pa.table({"sample_id": [str(i) for i in range(6)], "loss": [1.0] * 6})),
        r"per_sample_losses/test/epoch_0001\.parquet: column 'sample_id' must be integer, got string",
    ),
    "losses as integers": (
        lambda tmp: _files_with(epoch_0002=pa.table({"sample_id": list(range(6)), "loss": list(range(6))})),
        r"per_sample_losses/test/epoch_0002\.parquet: column 'loss' must be float, got int64",
    ),
    "uint64 ids past int64 (they would wrap negative)": (
        lambda tmp: _files_with(epoch_0000=pa.table({"sample_id": pa.array([0, 1, 2, 3, 4, 2**63], pa.uint64()),
                                                     "loss": [1.0] * 6})),
        r"per_sample_losses/test/epoch_0000\.parquet: sample ids \[9223372036854775808\] do not fit in int64",
    ),
    "duplicate ids": (
        lambda tmp: _files_with(epoch_0001=_table([0, 1, 2, 3, 3, 5], [1.0] * 6)),
        r"per_sample_losses/test/epoch_0001\.parquet: repeated sample ids \[3\]",
    ),
    "empty table": (
        lambda tmp: _files_with(epoch_0000=_table([], [])),
        r"per_sample_losses/test/epoch_0000\.parquet is empty",
    ),
    "negative epoch in the file name": (
        lambda tmp: _files_with(**{"epoch_-0001": _table(list(range(6)), [1.0] * 6)}),
        r"per_sample_losses/test/epoch_-0001\.parquet: not named epoch_EEEE\.parquet",
    ),
    "a pickle named .parquet": (
        lambda tmp: _files_with(epoch_0001=_pickle_bytes(tmp / "unpickled")),
        r"per_sample_losses/test/epoch_0001\.parquet is not a readable parquet file",
    ),
    "a CSV named .parquet": (
        lambda tmp: _files_with(epoch_0002=b"sample_id,loss\n0,1.0\n1,2.0\n"),
        r"per_sample_losses/test/epoch_0002\.parquet is not a readable parquet file",
    ),
    "a huge epoch number": (
        lambda tmp: {"per_sample_losses/test/epoch_99999999.parquet": _table(list(range(6)), [1.0] * 6)},
        r"split 'test': epoch tables missing: \[epoch_0000\.parquet, .*, epoch_0009\.parquet\] and 99999989 more "
        r"\(found 1 of epochs 0\.\.99999999\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_raises_naming_the_problem_and_is_left_unchanged(
    case: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    files, message = BAD_RUNS[case]
    run_id = _make_run(client, experiment_id, tmp_path, files(tmp_path) if callable(files) else files)
    client.set_tag(run_id, "owner", "someone")
    client.log_metric(run_id, "accuracy", 0.5, step=2)
    assert_refused_and_unchanged(client, tracker, run_id, message.replace(r"\w+", run_id))
    assert not (tmp_path / "unpickled").exists()  # a pickle named .parquet was never loaded


def assert_refused_and_unchanged(client: mlflow.MlflowClient, tracker: MLflowTracker, run_id: str,
                                 message: str) -> None:
    """The job on `run_id` raises an ActionScoresError matching `message`, and the run is as it was."""
    before = snapshot_run(client, run_id)
    assert before["files"]  # the snapshot sees the run's files
    with pytest.raises(ActionScoresError, match=message):
        analyze_run(tracker, run_id, panels=False)
    assert snapshot_run(client, run_id) == before
    assert "action_scores.status" not in client.get_run(run_id).data.tags


@pytest.mark.parametrize(("stray", "message"), [
    ("per_sample_losses/notes.txt", r"artifact path 'per_sample_losses/notes\.txt' is not of the form "
                                    r"per_sample_losses/<split>/epoch_EEEE\.parquet or "
                                    r"per_sample_losses/<split>/epoch_EEEE/part-RRRRR\.parquet"),
    ("per_sample_losses/test/old/epoch_0000.parquet",
     r"per_sample_losses/test/old/epoch_0000\.parquet: the folder of a sharded epoch is named epoch_EEEE"),
])
def test_stray_file_in_the_losses_folder_is_an_action_scores_error(
    stray: str, message: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    run_id = _make_run(client, experiment_id, tmp_path, {**_good_files(), stray: b"x"})
    assert_refused_and_unchanged(client, tracker, run_id, message)


def test_two_files_for_one_epoch_are_refused(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    files = {**_good_files(), "per_sample_losses/test/epoch_00001.parquet": _table(list(range(6)), [100.0] * 6)}
    run_id = _make_run(client, experiment_id, tmp_path, files)
    before = snapshot_run(client, run_id)
    with pytest.raises(ActionScoresError, match=r"split 'test': two tables for epoch 1: ") as error:
        analyze_run(tracker, run_id, panels=False)
    assert "per_sample_losses/test/epoch_0001.parquet" in str(error.value)
    assert "per_sample_losses/test/epoch_00001.parquet" in str(error.value)
    assert snapshot_run(client, run_id) == before


# --- (c) a whole experiment -----------------------------------------------------------------


def test_analyze_experiment_does_only_the_runs_that_need_it(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    name = client.get_experiment(experiment_id).name
    done_files, _, _ = _random_epochs(seed=21, n=7, epochs=2)
    already = _make_run(client, experiment_id, tmp_path, done_files)
    assert analyze_run(tracker, already, panels=False).status == "done"
    todo_files, todo_losses, todo_targets = _random_epochs(seed=22, n=9, epochs=3)
    todo = _make_run(client, experiment_id, tmp_path, todo_files)
    no_tables = _make_run(client, experiment_id, tmp_path, {"model/weights.bin": b"\x00\x01"})
    failed = _make_run(client, experiment_id, tmp_path, _good_files(), status="FAILED")
    bad = _make_run(client, experiment_id, tmp_path, BAD_RUNS["missing epoch"][0])  # finished, broken tables
    untouched = [already, failed, bad]
    before = {run_id: snapshot_run(client, run_id) for run_id in untouched}
    no_tables_files = [info.path for info in client.list_artifacts(no_tables)]

    results = analyze_experiment(tracker, name, panels=False)

    by_run = {result.run_id: result for result in results}
    assert len(results) == len(by_run) == 3  # no_tables and the FAILED run are left out
    assert {run_id: result.status for run_id, result in by_run.items()} == {
        already: "skipped", todo: "done", bad: "failed"
    }
    assert by_run[todo].samples == {"test": 9} and by_run[todo].epochs == {"test": 3}
    assert "split 'test': epoch tables missing: [epoch_0002.parquet]" in by_run[bad].message
    assert client.get_run(todo).data.tags["action_scores.status"] == "done"
    _check_scores(_scores(client, todo, "test", tmp_path / "s"), todo_losses, todo_targets)
    for run_id in untouched:
        assert snapshot_run(client, run_id) == before[run_id], run_id
    for run_id in (no_tables, failed, bad):
        assert "action_scores.status" not in client.get_run(run_id).data.tags
    assert [info.path for info in client.list_artifacts(no_tables)] == no_tables_files == ["model"]


def test_analyze_experiment_goes_on_after_a_run_with_a_stray_file(
    client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    name = client.get_experiment(experiment_id).name
    good = _make_run(client, experiment_id, tmp_path, _good_files(n=4, epochs=1))
    stray = _make_run(client, experiment_id, tmp_path, {**_good_files(n=4, epochs=1), "per_sample_losses/notes.txt": b"x"})
    results = {result.run_id: result.status for result in analyze_experiment(tracker, name, panels=False)}
    assert results == {good: "done", stray: "failed"}


class CountingTracker(MLflowTracker):
    """The real MLflow tracker, counting the job's reads of the run's tags and listings of its tables."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self.tag_reads = self.table_listings = 0

    def tags(self) -> dict[str, str]:
        self.tag_reads += 1
        return super().tags()

    def list_files(self, artifact_dir: str) -> list[str]:
        self.table_listings += artifact_dir == "per_sample_losses"
        return super().list_files(artifact_dir)


def test_an_experiments_job_lists_each_runs_tables_once_and_force_reads_no_status(
    client: mlflow.MlflowClient, mlflow_server: str, experiment_id: str, tmp_path: Path
) -> None:
    name = client.get_experiment(experiment_id).name
    runs = [_make_run(client, experiment_id, tmp_path, _good_files(n=4, epochs=2)) for _ in range(2)]
    first = CountingTracker(mlflow_server)
    assert {r.status for r in analyze_experiment(first, name, workers=1, panels=False)} == {"done"}
    assert first.table_listings == len(runs)  # one listing of each run's tables, not one to look and one to plan
    forced = CountingTracker(mlflow_server)
    assert {r.status for r in analyze_experiment(forced, name, workers=1, panels=False, force=True)} == {"done"}
    # The status is read twice a run without force (before the lock, then holding it), never with force: what
    # is left are the lock's own reads, the same in both passes.
    assert first.tag_reads - forced.tag_reads == 2 * len(runs)
