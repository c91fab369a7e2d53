"""The streaming accumulator: scores from hand-made epoch tables, checked against plain numpy / Python sums,
and every check and error message of the tables it is fed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracking.errors import ActionScoresError
from tracking.scoring.accumulator import ActionAccumulator
from tracking.scoring.engines import score_split
from tracking.scoring.tables import read_epoch_table


def _write(path: Path, columns: dict[str, object]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def _score(split: str, paths: list[Path]) -> pd.DataFrame:
    accumulator = ActionAccumulator(split)
    for epoch, path in enumerate(paths):
        accumulator.update(epoch, read_epoch_table(path, path.name), path.name)
    return accumulator.compute()


def _expected_ranks(action: dict[int, float]) -> dict[int, int]:
    """1 = highest action, ties by lower sample_id first, with plain Python sorting."""
    order = sorted(action, key=lambda sample_id: (-action[sample_id], sample_id))
    return {sample_id: position + 1 for position, sample_id in enumerate(order)}


def test_action_is_the_sum_over_epochs_of_shuffled_tables(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    n, epochs = 50, 6
    ids = rng.choice(1000, size=n, replace=False)  # sparse ids, not 0..n-1
    losses = rng.random((epochs, n)).astype(np.float32) * 4
    targets = rng.integers(0, 10, size=n)
    paths = []
    for epoch in range(epochs):
        order = rng.permutation(n)
        paths.append(_write(tmp_path / f"epoch_{epoch:04d}.parquet", {
            "sample_id": pa.array(ids[order], pa.int64()),
            "loss": pa.array(losses[epoch, order], pa.float32()),
            "target": pa.array(targets[order], pa.int64()),
        }))
    scores = _score("test", paths)

    assert list(scores.columns) == ["sample_id", "epochs", "action", "mean_loss", "rank", "label"]
    assert scores["sample_id"].tolist() == sorted(ids.tolist())
    by_id = {int(i): k for k, i in enumerate(ids)}
    expected_action = {int(i): sum(float(losses[e, by_id[int(i)]]) for e in range(epochs)) for i in ids}
    got = scores.set_index("sample_id")
    for sample_id, action in expected_action.items():
        assert got.loc[sample_id, "action"] == pytest.approx(action, rel=1e-12)
        assert got.loc[sample_id, "mean_loss"] == pytest.approx(action / epochs, rel=1e-12)
        assert got.loc[sample_id, "label"] == targets[by_id[sample_id]]
    np.testing.assert_allclose(
        got.loc[ids, "action"].to_numpy(), losses.astype(np.float64).sum(axis=0), rtol=1e-12
    )
    assert (scores["epochs"] == epochs).all() and scores["epochs"].dtype == np.int64
    assert scores["action"].dtype == np.float64
    ranks = _expected_ranks(expected_action)
    assert {int(s): int(r) for s, r in zip(scores["sample_id"], scores["rank"])} == ranks


def test_each_part_gets_its_own_action(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n, epochs = 12, 3
    loc = rng.random((epochs, n)).astype(np.float32)
    cls = rng.random((epochs, n)).astype(np.float32) * 2
    paths = []
    for epoch in range(epochs):
        order = rng.permutation(n)
        total = (loc[epoch] + cls[epoch]).astype(np.float32)
        paths.append(_write(tmp_path / f"epoch_{epoch:04d}.parquet", {
            "sample_id": pa.array(order, pa.int32()),
            "loss_loc": loc[epoch, order],
            "loss": total[order],
            "loss_cls": cls[epoch, order],
        }))
    scores = _score("train", paths)
    assert set(scores.columns) == {"sample_id", "epochs", "action", "action_loc", "action_cls", "mean_loss", "rank"}
    assert scores["sample_id"].tolist() == list(range(n))
    np.testing.assert_allclose(scores["action_loc"], loc.astype(np.float64).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scores["action_cls"], cls.astype(np.float64).sum(axis=0), rtol=1e-12)
    total = sum((loc[e] + cls[e]).astype(np.float32).astype(np.float64) for e in range(epochs))
    np.testing.assert_allclose(scores["action"], total, rtol=1e-12)
    np.testing.assert_allclose(scores["mean_loss"], total / epochs, rtol=1e-12)


def test_rank_breaks_ties_by_lower_sample_id(tmp_path: Path) -> None:
    # Sums: id 5 -> 3, id 2 -> 3, id 9 -> 7, id 0 -> 1, id 4 -> 3, id 1 -> 1 (exact in binary floats).
    e0 = {5: 1.0, 2: 2.0, 9: 3.5, 0: 0.5, 4: 1.5, 1: 0.25}
    e1 = {5: 2.0, 2: 1.0, 9: 3.5, 0: 0.5, 4: 1.5, 1: 0.75}
    paths = [
        _write(tmp_path / f"epoch_{epoch:04d}.parquet", {"sample_id": list(table), "loss": pa.array(list(table.values()), pa.float64())})
        for epoch, table in enumerate((e0, e1))
    ]
    scores = _score("test", paths)
    rank = dict(zip(scores["sample_id"].tolist(), scores["rank"].tolist()))
    assert rank == {9: 1, 2: 2, 4: 3, 5: 4, 0: 5, 1: 6}
    assert rank == _expected_ranks({k: e0[k] + e1[k] for k in e0})


def test_labels_come_from_the_target_column_and_are_absent_without_it(tmp_path: Path) -> None:
    with_target = _write(tmp_path / "a.parquet", {"sample_id": [2, 0, 1], "loss": [1.0, 2.0, 3.0], "target": ["cat", "dog", "cow"]})
    scores = _score("test", [with_target])
    assert scores["label"].tolist() == ["dog", "cow", "cat"]
    without = _write(tmp_path / "b.parquet", {"sample_id": [0, 1], "loss": [1.0, 2.0]})
    assert "label" not in _score("test", [without]).columns


def test_read_epoch_table_sorts_by_sample_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "epoch_0000.parquet", {"sample_id": [3, 1, 2], "loss": pa.array([0.3, 0.1, 0.2], pa.float32())})
    table = read_epoch_table(path, "x")
    assert table.column("sample_id").to_pylist() == [1, 2, 3]
    assert table.column("loss").to_pylist() == pytest.approx([0.1, 0.2, 0.3])


def test_ids_differing_between_epochs_name_the_missing_and_unexpected(tmp_path: Path) -> None:
    first = _write(tmp_path / "epoch_0000.parquet", {"sample_id": [0, 1, 2, 3], "loss": [1.0] * 4})
    second = _write(tmp_path / "epoch_0001.parquet", {"sample_id": [0, 7, 2, 1], "loss": [1.0] * 4})
    with pytest.raises(
        ActionScoresError,
        match=r"epoch_0001\.parquet: sample ids differ from epoch 0 of split 'test': missing \[3\], unexpected \[7\]",
    ):
        _score("test", [first, second])
    fewer = _write(tmp_path / "epoch_0002.parquet", {"sample_id": [0, 1], "loss": [1.0] * 2})
    with pytest.raises(ActionScoresError, match=r"epoch_0002\.parquet: .*missing \[2, 3\], unexpected \[\]"):
        _score("test", [first, fewer])


def test_nan_and_inf_losses_name_samples_and_epochs(tmp_path: Path) -> None:
    paths = [
        _write(tmp_path / "epoch_0000.parquet", {"sample_id": [0, 1, 2, 3, 4], "loss": [1.0, 1.0, 1.0, 1.0, 1.0]}),
        _write(tmp_path / "epoch_0001.parquet", {"sample_id": [0, 1, 2, 3, 4], "loss": [1.0, 1.0, float("nan"), 1.0, 1.0]}),
        _write(tmp_path / "epoch_0002.parquet", {"sample_id": [4, 3, 2, 1, 0], "loss": [float("inf"), 1.0, 1.0, float("-inf"), 1.0]}),
    ]
    with pytest.raises(ActionScoresError, match=r"split 'test' has NaN or infinite losses") as error:
        _score("test", paths)
    message = str(error.value)
    assert "epoch 1: samples [2]" in message
    assert "epoch 2: samples [1, 4]" in message
    assert "epoch 0" not in message


def test_nan_in_a_part_column_is_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "epoch_0000.parquet", {"sample_id": [0, 1], "loss": [1.0, 2.0], "loss_loc": [float("nan"), 2.0]})
    with pytest.raises(ActionScoresError, match=r"epoch 0: samples \[0\]"):
        _score("test", [path])


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "epoch_0000.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file at all")
    with pytest.raises(ActionScoresError, match=r"per_sample_losses/test/epoch_0000\.parquet is not a readable parquet file"):
        read_epoch_table(path, "per_sample_losses/test/epoch_0000.parquet")
    truncated = tmp_path / "epoch_0001.parquet"
    good = _write(tmp_path / "good.parquet", {"sample_id": list(range(100)), "loss": [1.0] * 100})
    truncated.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ActionScoresError, match=r"epoch_0001\.parquet is not a readable parquet file"):
        read_epoch_table(truncated, "epoch_0001.parquet")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"sample_id": [0, 1]}, r"t\.parquet has no 'loss' column \(columns: \['sample_id'\]\)"),
        ({"id": [0, 1], "loss": [1.0, 2.0]}, r"t\.parquet has no 'sample_id' column \(columns: \['id', 'loss'\]\)"),
        ({"sample_id": [0.0, 1.0], "loss": [1.0, 2.0]}, r"t\.parquet: column 'sample_id' must be integer, got double"),
        ({"sample_id": ["a", "b"], "loss": [1.0, 2.0]}, r"t\.parquet: column 'sample_id' must be integer, got string"),
        ({"sample_id": [0, 1], "loss": [1, 2]}, r"t\.parquet: column 'loss' must be float, got int64"),
        ({"sample_id": [0, 1], "loss": ["1", "2"]}, r"t\.parquet: column 'loss' must be float, got string"),
        ({"sample_id": [0, 1], "loss": [1.0, 2.0], "loss_loc": [1, 2]}, r"t\.parquet: column 'loss_loc' must be float, got int64"),
        ({"sample_id": pa.array([], pa.int64()), "loss": pa.array([], pa.float32())}, r"t\.parquet is empty"),
        ({"sample_id": [4, 3, 1, 3, 4, 0], "loss": [1.0] * 6}, r"t\.parquet: repeated sample ids \[3, 4\]"),
    ],
)
def test_bad_tables_are_refused_naming_the_file(tmp_path: Path, columns: dict, message: str) -> None:
    path = _write(tmp_path / "t.parquet", columns)
    with pytest.raises(ActionScoresError, match=message):
        read_epoch_table(path, "t.parquet")


def test_parts_changing_between_epochs_are_refused(tmp_path: Path) -> None:
    first = _write(tmp_path / "epoch_0000.parquet", {"sample_id": [0], "loss": [1.0], "loss_loc": [1.0]})
    second = _write(tmp_path / "epoch_0001.parquet", {"sample_id": [0], "loss": [1.0]})
    with pytest.raises(ActionScoresError, match=r"epoch_0001\.parquet: loss columns \['loss'\] differ from epoch 0's \['loss', 'loss_loc'\]"):
        _score("test", [first, second])


def test_epochs_must_come_in_order_and_at_least_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "epoch_0001.parquet", {"sample_id": [0], "loss": [1.0]})
    accumulator = ActionAccumulator("test")
    with pytest.raises(ActionScoresError, match=r"epoch_0001\.parquet: expected epoch 0, got 1"):
        accumulator.update(1, read_epoch_table(path, path.name), path.name)
    with pytest.raises(ActionScoresError, match=r"split 'test': no epoch tables to score"):
        accumulator.compute()


def test_null_losses_are_reported_like_nan(tmp_path: Path) -> None:
    path = _write(tmp_path / "epoch_0000.parquet", {"sample_id": [0, 1, 2], "loss": pa.array([1.0, None, 3.0], pa.float32())})
    with pytest.raises(ActionScoresError, match=r"NaN or infinite losses.*epoch 0: samples \[1\]"):
        _score("test", [path])


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_null_sample_ids_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet", {"sample_id": pa.array([0, None, 2], pa.int64()), "loss": [1.0, 2.0, 3.0]})
    with pytest.raises(ActionScoresError, match=r"t\.parquet.*sample_id"):
        _score("test", [path])


def test_a_column_with_an_empty_part_name_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet", {"sample_id": [0, 1], "loss": [1.0, 2.0], "loss_": [1.0, 2.0]})
    with pytest.raises(ActionScoresError, match=r"t\.parquet"):
        read_epoch_table(path, "t.parquet")


# --- the training-dynamics scores on hand-made tables (moved from test_dynamics) -----------


def _score_dynamics(tmp_path: Path, epochs: list[dict[str, object]], el2n_epoch: int = 0) -> pd.DataFrame:
    accumulator = ActionAccumulator("test", el2n_epoch=el2n_epoch)
    for epoch, columns in enumerate(epochs):
        path = _write(tmp_path / f"epoch_{epoch:04d}.parquet", columns)
        accumulator.update(epoch, read_epoch_table(path, path.name), path.name)
    return accumulator.compute()


def _columns(p_true: list[float], correct: list[bool]) -> dict[str, object]:
    n = len(p_true)
    return {"sample_id": pa.array(range(n), pa.int64()), "loss": pa.array([1.0] * n, pa.float32()),
            "p_true": pa.array(p_true, pa.float32()), "correct": pa.array(correct),
            "margin": pa.array([0.5] * n, pa.float32()), "el2n": pa.array([0.25] * n, pa.float32())}


def test_forgetting_counts_every_right_to_wrong_transition(tmp_path: Path) -> None:
    history = [[True, False], [False, False], [True, False], [False, False], [True, True]]
    scores = _score_dynamics(tmp_path, [_columns([0.5, 0.5], row) for row in history])
    assert scores["forgetting"].tolist() == [2, 0]  # right, wrong, right, wrong, right; learned at the end
    assert scores["correctness"].tolist() == [0.6, 0.2]


def test_el2n_epoch_outside_the_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match=r"el2n epoch 2 is not one of the run's epochs 0\.\.1"):
        _score_dynamics(tmp_path, [_columns([0.5], [True])] * 2, el2n_epoch=2)


def test_columns_changing_between_epochs_are_refused(tmp_path: Path) -> None:
    second = _columns([0.5], [True])
    del second["margin"]
    with pytest.raises(ActionScoresError, match=r"epoch_0001\.parquet: per-sample columns .* differ from epoch 0's"):
        _score_dynamics(tmp_path, [_columns([0.5], [True]), second])


def test_wrong_column_types_are_refused(tmp_path: Path) -> None:
    bad = _columns([0.5], [True])
    bad["correct"] = pa.array([1], pa.int64())
    with pytest.raises(ActionScoresError, match=r"column 'correct' must be bool, got int64"):
        _score_dynamics(tmp_path, [bad])


def test_nan_probability_is_refused_naming_the_sample(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match=r"NaN or infinite values in \['p_true'\], .* epoch 0: samples \[1\]"):
        _score_dynamics(tmp_path, [_columns([0.5, float("nan")], [True, True])])


def test_job_scores_of_many_samples_equal_numpy_over_all_epochs(tmp_path: Path) -> None:
    """The job's own path (parallel readers, unused columns skipped, blocked updates) on tables
    larger than a block, cut in several row groups, ids shuffled, against formulas on the whole
    stacked (epochs x samples) arrays."""
    rng = np.random.default_rng(7)
    size, epochs, el2n_epoch = 70_001, 5, 2
    ids = rng.permutation(size * 2)[:size]
    target = rng.integers(0, 10, size)
    loss = rng.exponential(1.0, (epochs, size)).astype(np.float32)
    p_true = rng.uniform(0, 1, (epochs, size)).astype(np.float32)
    correct = rng.uniform(0, 1, (epochs, size)) < 0.6
    margin = rng.normal(0, 2, (epochs, size)).astype(np.float32)
    el2n = rng.uniform(0, 1.4, (epochs, size)).astype(np.float32)
    tables = []
    for epoch in range(epochs):
        order = rng.permutation(size)
        table = pa.table({"sample_id": ids[order], "loss": loss[epoch, order], "target": target[order],
                          "correct": correct[epoch, order], "p_true": p_true[epoch, order],
                          "margin": margin[epoch, order], "el2n": el2n[epoch, order]})
        path = tmp_path / f"epoch_{epoch:04d}.parquet"
        pq.write_table(table, path, row_group_size=30_000)
        tables.append((path.name, path))

    scores = score_split("train", tables, el2n_epoch=el2n_epoch).set_index("sample_id")
    by_id = np.argsort(ids)  # the scores come in id order
    p64 = p_true.astype(np.float64)[:, by_id]
    right = correct[:, by_id]
    forgotten = (right[:-1] & ~right[1:]).sum(axis=0)
    np.testing.assert_allclose(scores["action"], loss.astype(np.float64)[:, by_id].sum(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(scores["label"], target[by_id])
    np.testing.assert_allclose(scores["confidence"], p64.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(scores["variability"], p64.std(axis=0), rtol=1e-9)
    np.testing.assert_array_equal(scores["correctness"], right.mean(axis=0))
    np.testing.assert_array_equal(scores["forgetting"], np.where(right.any(axis=0), forgotten, epochs))
    np.testing.assert_allclose(scores["aum"], margin.astype(np.float64)[:, by_id].mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(scores["el2n"], el2n[el2n_epoch, by_id])
