"""Sharded epochs (`per_sample_losses/<split>/epoch_EEEE/part-RRRRR.parquet`) on runs of the real MLflow server:
the job scores them as the single-file form of the same data (both engines), keeps the first part's row of an
id in several parts, refuses a mixed split, hostile or misnamed parts and a missing epoch or part, naming the
files; select, compare and the panels work on sharded runs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

import tracking.fetch
from tests.conftest import snapshot_run
from tests.test_analyze import _make_run
from tracking import contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.compare import compare_runs
from tracking.errors import ActionScoresError
from tracking.fetch import Fetched, RunFiles
from tracking.report.panels import read_panel_rows
from tracking.scoring.tables import epoch_files
from tracking.selection import select_run

SPLIT, SAMPLES, EPOCHS, PARTS = "test", 40, 3, 3
PAD = 2  # a DistributedSampler pads its last shares with copies of the first samples of its order
SUMS = ["action", "action_loc", "mean_loss"]  # equal bit for bit; every other float within 1e-12 relative
COPY_LOSS = 1000.0  # a later copy's loss: were it kept, the sums would show it


def _epoch_columns(rng: np.random.Generator, targets: np.ndarray) -> dict[str, np.ndarray]:
    """One epoch's true row per sample id 0..SAMPLES-1, with every column the registry's scores read."""
    p_true = rng.uniform(0.05, 0.95, SAMPLES).astype(np.float32)
    return {
        "sample_id": np.arange(SAMPLES, dtype=np.int64),
        "loss": (-np.log(p_true)).astype(np.float32),
        "loss_loc": rng.exponential(1.0, SAMPLES).astype(np.float32),
        "target": targets,
        "correct": rng.random(SAMPLES) < p_true,
        "p_true": p_true,
        "margin": rng.normal(0.0, 2.0, SAMPLES).astype(np.float32),
        "el2n": rng.uniform(0.0, 1.4, SAMPLES).astype(np.float32),
        "prediction": np.where(rng.random(SAMPLES) < 0.6, targets, rng.integers(0, 4, SAMPLES)),
    }


def _table(columns: dict[str, np.ndarray], rows: np.ndarray) -> pa.Table:
    return pa.table({name: values[rows] for name, values in columns.items()})


def _later_copy(table: pa.Table) -> pa.Table:
    """The rows of a padded copy, every value changed: a reader that kept them would score differently."""
    changed = {name: table.column(name) for name in table.column_names}
    changed["loss"] = pa.array(np.full(table.num_rows, COPY_LOSS, np.float32))
    changed["loss_loc"] = pa.array(np.full(table.num_rows, COPY_LOSS, np.float32))
    changed["target"] = pc.add(table.column("target"), 1)
    changed["prediction"] = pc.add(table.column("prediction"), 2)
    changed["correct"] = pc.invert(table.column("correct"))
    return pa.table(changed)


def _runs_data(seed: int, parts: int = PARTS) -> tuple[dict[str, pa.Table], dict[str, pa.Table], list[dict]]:
    """The same epochs as (sharded files, single files, true columns per epoch).

    Each epoch's ids are shuffled, padded with PAD copies of the first ones and dealt round robin to `parts`
    parts, as a DistributedSampler deals them; each part is sorted by sample_id. The copies fall in later
    parts, with other values. The single files hold each id's first occurrence, in shuffled row order.
    """
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 4, SAMPLES)
    sharded, single, truth = {}, {}, []
    for epoch in range(EPOCHS):
        columns = _epoch_columns(rng, targets)
        truth.append(columns)
        order = rng.permutation(SAMPLES)
        padded = np.concatenate([order, order[:PAD]])
        seen: set[int] = set()
        for part in range(parts):
            share = padded[part::parts]
            rows = np.sort(share)
            first = np.array([sample not in seen for sample in rows])
            seen.update(rows.tolist())
            table = _table(columns, rows)
            table = pa.concat_tables([table.filter(pa.array(first)), _later_copy(table.filter(pa.array(~first)))])
            sharded[f"{contract.epoch_parts_dir(SPLIT, epoch)}/{contract.part_file_name(part)}"] = table.sort_by(
                "sample_id")
        single[f"{contract.losses_dir(SPLIT)}/{contract.epoch_file_name(epoch)}"] = _table(
            columns, rng.permutation(SAMPLES))
    return sharded, single, truth


def _scores(client: mlflow.MlflowClient, run_id: str, dst: Path) -> pd.DataFrame:
    path = f"{contract.scores_dir(SPLIT)}/{contract.SCORES_FILE}"
    return pd.read_parquet(client.download_artifacts(run_id, path, str(dst / run_id)))


@pytest.mark.parametrize("engine", ["arrow", "duckdb"])
def test_a_sharded_run_scores_as_its_single_file_form(
        engine: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A window of one epoch, fewer places than an epoch has parts: a sharded epoch takes one place, all its
    # parts fetched at once, so the scorer never waits for a part the window holds back.
    monkeypatch.setattr(tracking.fetch, "FETCH_AHEAD", 1)
    sharded_files, single_files, truth = _runs_data(seed=1)
    sharded = _make_run(client, experiment_id, tmp_path / "made", sharded_files)
    single = _make_run(client, experiment_id, tmp_path / "made", single_files)
    results = [analyze_run(tracker, run_id, panels=False, engine=engine, progress=False)
               for run_id in (sharded, single)]
    assert [r.status for r in results] == ["done", "done"]
    assert results[0].samples == {SPLIT: SAMPLES} and results[0].epochs == {SPLIT: EPOCHS}

    got, expected = _scores(client, sharded, tmp_path), _scores(client, single, tmp_path)
    assert list(got.columns) == list(expected.columns)
    if engine == "arrow":
        assert {"aum", "forgetting", "confidence", "variability", "correctness", "el2n", "region"} <= set(got.columns)
    else:
        assert list(got.columns) == ["sample_id", "epochs", "action", "action_loc", "mean_loss", "rank", "label"]
    floats = [c for c in got.columns if c not in SUMS and pd.api.types.is_float_dtype(got[c])]
    exact = [c for c in got.columns if c not in floats]
    pd.testing.assert_frame_equal(got[exact], expected[exact], check_exact=True)  # sums bit for bit, ids, counts
    pd.testing.assert_frame_equal(got[floats], expected[floats], check_exact=False, rtol=1e-12, atol=0)
    # And the sums are the first occurrences': no copy's COPY_LOSS in any of them.
    total = np.zeros(SAMPLES)
    for columns in truth:
        total += columns["loss"].astype(np.float64)
    np.testing.assert_allclose(got.set_index("sample_id").sort_index()["action"], total, rtol=1e-12)
    assert (got["label"].to_numpy() == truth[0]["target"][got["sample_id"].to_numpy()]).all()


@pytest.mark.parametrize("engine", ["arrow", "duckdb"])
def test_an_id_in_several_parts_keeps_the_first_part_s_row_and_a_part_may_be_empty(
        engine: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    def part(ids: list[int], losses: list[float], targets: list[int]) -> pa.Table:
        return pa.table({"sample_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float32()),
                         "target": pa.array(targets, pa.int64())})

    files = {}
    for epoch in range(2):
        folder = contract.epoch_parts_dir(SPLIT, epoch)
        files[f"{folder}/part-00000.parquet"] = part([0, 2, 4], [1.0, 2.0, 3.0], [7, 7, 7])
        files[f"{folder}/part-00001.parquet"] = part([0, 1, 3], [50.0, 4.0, 5.0], [9, 8, 8])  # 0 again: dropped
        files[f"{folder}/part-00002.parquet"] = part([1, 2, 5], [60.0, 70.0, 6.0], [9, 9, 8])  # 1 and 2 again
        files[f"{folder}/part-00003.parquet"] = part([], [], [])  # a process without a share
    run_id = _make_run(client, experiment_id, tmp_path / "made", files)
    analyze_run(tracker, run_id, panels=False, engine=engine, progress=False)
    scores = _scores(client, run_id, tmp_path).set_index("sample_id")
    assert scores.index.tolist() == [0, 1, 2, 3, 4, 5]
    assert scores["action"].tolist() == [2.0, 8.0, 4.0, 10.0, 6.0, 12.0]
    assert scores["label"].tolist() == [7, 8, 7, 8, 7, 8]
    assert (scores["epochs"] == 2).all()


def test_a_split_that_mixes_both_forms_is_refused_naming_the_files(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    sharded, single, _ = _runs_data(seed=2)
    files = {path: table for path, table in single.items() if "epoch_0000" in path}
    files |= {path: table for path, table in sharded.items() if "epoch_0000" not in path}
    run_id = _make_run(client, experiment_id, tmp_path / "made", files)
    before = snapshot_run(client, run_id)
    with pytest.raises(ActionScoresError) as error:
        analyze_run(tracker, run_id, panels=False, progress=False)
    assert str(error.value) == (
        "split 'test' mixes single-file epochs (per_sample_losses/test/epoch_0000.parquet) and sharded ones "
        "(per_sample_losses/test/epoch_0001/part-00000.parquet, per_sample_losses/test/epoch_0001/part-00001.parquet, "
        "per_sample_losses/test/epoch_0001/part-00002.parquet and 3 more): write every epoch of a split as "
        "epoch_EEEE.parquet, or every one as epoch_EEEE/part-RRRRR.parquet")
    assert snapshot_run(client, run_id) == before


@pytest.mark.parametrize(("path", "message"), [
    ("per_sample_losses/test/epoch_0001/part-1.parquet",
     r"per_sample_losses/test/epoch_0001/part-1\.parquet: a part of a sharded epoch is named part-RRRRR\.parquet"),
    ("per_sample_losses/test/epoch_0001/rank1/part-00001.parquet",
     r"artifact path 'per_sample_losses/test/epoch_0001/rank1/part-00001\.parquet' is not of the form "
     r"per_sample_losses/<split>/epoch_EEEE\.parquet or per_sample_losses/<split>/epoch_EEEE/part-RRRRR\.parquet"),
    ("per_sample_losses/test/epoch_1/part-00001.parquet",
     r"per_sample_losses/test/epoch_1/part-00001\.parquet: the folder of a sharded epoch is named epoch_EEEE"),
])
def test_a_misnamed_part_on_a_run_is_refused_naming_it(
        path: str, message: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str,
        tmp_path: Path) -> None:
    sharded, _, _ = _runs_data(seed=3)
    run_id = _make_run(client, experiment_id, tmp_path / "made", sharded | {path: next(iter(sharded.values()))})
    before = snapshot_run(client, run_id)
    with pytest.raises(ActionScoresError, match=message):
        analyze_run(tracker, run_id, panels=False, progress=False)
    assert snapshot_run(client, run_id) == before


@pytest.mark.parametrize("path", [
    "per_sample_losses/test/epoch_0000/../../../../etc/part-00000.parquet",
    "per_sample_losses/test/../../epoch_0000/part-00000.parquet",
    "/per_sample_losses/test/epoch_0000/part-00000.parquet",
    "per_sample_losses\\test\\epoch_0000\\..\\..\\..\\part-00000.parquet",
])
def test_a_part_path_that_climbs_out_of_the_run_is_refused(
        path: str, tracker: MLflowTracker, client: mlflow.MlflowClient, experiment_id: str, tmp_path: Path) -> None:
    listed = ["per_sample_losses/test/epoch_0000/part-00000.parquet", path]  # as a server could list them
    with pytest.raises(ActionScoresError, match="escapes the run's artifact folder"):
        epoch_files(listed)
    sharded, _, _ = _runs_data(seed=4)
    tracker.attach(_make_run(client, experiment_id, tmp_path / "made", sharded))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ActionScoresError, match="escapes the run's artifact folder"):
        tracker.download(path, tmp_path / "dst")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_missing_sharded_epoch_or_part_is_named(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    sharded, _, _ = _runs_data(seed=5)
    no_epoch = {path: table for path, table in sharded.items() if "/epoch_0001/" not in path}
    run_id = _make_run(client, experiment_id, tmp_path / "made", no_epoch)
    with pytest.raises(ActionScoresError, match=r"^split 'test': sharded epochs missing: "
                                                r"\[per_sample_losses/test/epoch_0001/\] \(found 2 of epochs 0\.\.2\)$"):
        analyze_run(tracker, run_id, panels=False, progress=False)
    missing = "per_sample_losses/test/epoch_0002/part-00001.parquet"
    no_part = {path: table for path, table in sharded.items() if path != missing}
    run_id = _make_run(client, experiment_id, tmp_path / "made", no_part)
    with pytest.raises(ActionScoresError, match=r"^split 'test', epoch 2: parts missing: "
                                                r"\[per_sample_losses/test/epoch_0002/part-00001\.parquet\] "
                                                r"\(found 2 of parts 0\.\.2\)$"):
        analyze_run(tracker, run_id, panels=False, progress=False)
    # Parts that hold different columns are named too.
    folder = contract.epoch_parts_dir(SPLIT, 1)
    other = dict(sharded, **{f"{folder}/part-00002.parquet": sharded[f"{folder}/part-00002.parquet"].drop(["margin"])})
    run_id = _make_run(client, experiment_id, tmp_path / "made", other)
    with pytest.raises(ActionScoresError, match=rf"^{folder}/part-00002\.parquet: columns \[sample_id: int64, .*\] "
                                                rf"differ from {folder}/part-00000\.parquet's \[sample_id: int64, "):
        analyze_run(tracker, run_id, panels=False, progress=False)


def test_a_sharded_epoch_takes_one_place_of_the_fetch_window_and_its_parts_come_together(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    sharded, _, _ = _runs_data(seed=8)
    tracker.attach(_make_run(client, experiment_id, tmp_path / "made", sharded))
    epochs = epoch_files(tracker.list_files(contract.LOSSES_DIR))[SPLIT]
    with RunFiles(tracker, tmp_path / "in", ahead=1, progress=False) as files:
        futures = files.stream(epochs)
        arrived = [future.result(timeout=60) for future in futures[0]]  # every part of epoch 0, none released
        assert [found.take() for found in arrived] == [_bytes(sharded[path]) for path in epochs[0]]
        for path in epochs[0][:-1]:
            files.release(path)
        assert not any(future.done() for future in futures[1])  # epoch 0 still holds the place
        files.release(epochs[0][-1])
        assert all(isinstance(future.result(timeout=60), Fetched) for future in futures[1])
        for epoch in epochs[1:]:
            for path in epoch:
                files.release(path)
        assert all(isinstance(future.result(timeout=60), Fetched) for future in futures[2])


def _bytes(table: pa.Table) -> bytes:
    """The file `_make_run` writes of a table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_a_sharded_w_and_b_offline_run_is_read_in_place_and_scores_as_its_single_file_form(
        wandb_env: dict[str, str], tmp_path: Path) -> None:
    from tracking.backends import WandbTracker
    from tracking.scoring.engines import score_split

    sharded, single, _ = _runs_data(seed=9)
    written = tmp_path / "written"
    for path, table in {**sharded, **single}.items():
        (written / path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, written / path)
    tracker = WandbTracker()
    run_id = tracker.start()
    for path in sharded:
        tracker.write_artifact(written / path, path.rsplit("/", 1)[0])
    tracker.finish()
    folder = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))[0]
    assert analyze_run(WandbTracker(), str(folder), panels=False, progress=False).status == "done"

    reader = WandbTracker()
    reader.attach(str(folder))
    local = reader.local_file(f"{contract.epoch_parts_dir(SPLIT, 0)}/{contract.part_file_name(0)}")
    assert local is not None and local.is_relative_to(folder)  # in place: the job copies nothing
    got = pd.read_parquet(reader.download(f"{contract.scores_dir(SPLIT)}/{contract.SCORES_FILE}", tmp_path / "back"))
    expected = score_split(SPLIT, [(path, written / path) for path in single], progress=False)
    pd.testing.assert_frame_equal(got[SUMS], expected[SUMS], check_exact=True)
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12, atol=0)


def _picture(sample_id: int) -> np.ndarray:
    """A small image per sample, so that the job draws panels of a run without media."""
    return np.full((8, 8, 3), sample_id % 256, dtype=np.uint8)


def test_select_compare_and_panels_work_on_sharded_runs(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    runs, truths = [], []
    for seed in (6, 7):
        sharded, _, truth = _runs_data(seed)
        runs.append(_make_run(client, experiment_id, tmp_path / "made", sharded))
        truths.append(truth)
    result = analyze_run(tracker, runs[0], top_k=3, pictures=_picture, progress=False)
    analyze_run(tracker, runs[1], panels=False, progress=False)
    scores = _scores(client, runs[0], tmp_path)
    hardest = scores.sort_values("rank")["sample_id"].tolist()[:3]
    panel = f"{contract.scores_dir(SPLIT)}/loss/hardest.png"
    assert panel in result.panels
    rows = read_panel_rows(client.download_artifacts(runs[0], panel, str(tmp_path / "panel")))
    assert rows[0]["sample_ids"] == hardest

    # select: the hardest by action, and the suggested labels from the union of each epoch's parts.
    selection = select_run(tracker, runs[0], by="action", split=SPLIT, fraction=0.1)
    assert selection.table["sample_id"].tolist() == scores.sort_values("rank")["sample_id"].tolist()[:4]
    for sample, label, suggested in selection.table[["sample_id", "label", "suggested_label"]].itertuples(index=False):
        votes = Counter(int(columns["prediction"][sample]) for columns in truths[0]).most_common()
        best = min(value for value, count in votes if count == votes[0][1])
        assert label == truths[0][0]["target"][sample]
        assert pd.isna(suggested) if best == label else suggested == best

    # compare: the Spearman correlation of the two sharded runs' actions.
    comparison = compare_runs(tracker, runs, split=SPLIT, top_k=5, experiment=f"compare-{experiment_id}")
    actions = [_scores(client, run_id, tmp_path).set_index("sample_id")["action"].sort_index() for run_id in runs]
    assert comparison.spearman.loc[runs[0], runs[1]] == pytest.approx(spearmanr(*actions).statistic, abs=1e-12)
