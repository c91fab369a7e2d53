"""LossRecorder: one validated table per split and epoch, written locally and to a real MLflow run."""

from __future__ import annotations



import re
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tracking.errors import ActionScoresError
from tracking.record.recorder import LossRecorder
from tracking.backends import MLflowTracker


def _read(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_any_order_and_short_last_batch_give_one_sorted_float32_row_per_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 10
    losses = rng.random(n) * 5  # float64 on purpose: stored as float32
    order = rng.permutation(n)
    recorder = LossRecorder("test", num_samples=n, local_dir=tmp_path)
    batches = _batches(order, 4)
    assert [len(b) for b in batches] == [4, 4, 2]  # the last batch is short
    for ids in batches:
        recorder.update(torch.as_tensor(ids), torch.as_tensor(losses[ids]))
    path = recorder.end_epoch(0)

    table = pq.read_table(path)
    assert table.column_names == ["sample_id", "loss"]
    assert table.schema.field("sample_id").type == pa.int64()
    assert table.schema.field("loss").type == pa.float32()
    data = table.to_pydict()
    assert data["sample_id"] == list(range(n))
    assert data["loss"] == [float(np.float32(v)) for v in losses]


def test_numpy_ids_and_losses_that_require_grad_are_accepted(tmp_path: Path) -> None:
    weights = torch.tensor([0.5, 1.5, 2.5], requires_grad=True)
    losses = weights * 2  # part of an autograd graph, as in a training pass
    recorder = LossRecorder("train", num_samples=3, local_dir=tmp_path)
    recorder.update(np.array([2, 0, 1]), losses)
    data = _read(recorder.end_epoch(0))
    assert data["sample_id"] == [0, 1, 2]
    assert data["loss"] == [3.0, 5.0, 1.0]  # losses of ids 0, 1, 2 = 2*w[1], 2*w[2], 2*w[0]


def test_repeated_ids_keep_the_first_occurrence(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=5, local_dir=tmp_path)
    recorder.update(torch.tensor([3, 1, 1]), torch.tensor([30.0, 10.0, 11.0]))  # repeat inside a batch
    recorder.update(torch.tensor([0, 2, 4]), torch.tensor([0.0, 20.0, 40.0]))
    # DistributedSampler-style padding: copies of earlier samples with other losses.
    recorder.update(torch.tensor([3, 0]), torch.tensor([99.0, 98.0]))
    data = _read(recorder.end_epoch(0))
    assert data["sample_id"] == [0, 1, 2, 3, 4]
    assert data["loss"] == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_missing_samples_raise_at_end_epoch_naming_them_and_write_nothing(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=10, local_dir=tmp_path)
    present = [i for i in range(10) if i not in (4, 7)]
    recorder.update(torch.tensor(present), torch.ones(len(present)))  # no error yet
    with pytest.raises(ActionScoresError, match=r"^split 'test', epoch 0: 2 of 10 samples missing: \[4, 7\]$"):
        recorder.end_epoch(0)
    assert not list(tmp_path.rglob("*.parquet"))


def test_out_of_range_ids_raise_at_end_epoch_naming_them(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=10, local_dir=tmp_path)
    recorder.update(torch.arange(10), torch.ones(10))
    recorder.update(torch.tensor([10, -1, 12]), torch.ones(3))
    with pytest.raises(ActionScoresError, match=r"^split 'test', epoch 0: sample ids out of range \[0, 10\): \[-1, 10, 12\]$"):
        recorder.end_epoch(0)
    assert not list(tmp_path.rglob("*.parquet"))


def test_scalar_loss_raises_at_once_asking_for_reduction_none(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    logits, targets = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    mean_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="mean")
    with pytest.raises(ActionScoresError, match=r"'loss' is a scalar.*reduction='none'"):
        recorder.update(torch.arange(4), mean_loss)
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"'loss_cls' is a scalar.*reduction='none'"):
        recorder.update(torch.arange(4), {"cls": mean_loss})


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        (torch.ones(4, 3), r"'loss' has shape \(4, 3\); expected \(4,\)"),  # reduction='none' on a (N, C) loss
        (torch.ones(3), r"'loss' has shape \(3,\); expected \(4,\)"),
        (torch.ones(5), r"'loss' has shape \(5,\); expected \(4,\)"),
        ({"cls": torch.ones(4), "loc": torch.ones(2)}, r"'loss_loc' has shape \(2,\); expected \(4,\)"),
    ],
)
def test_losses_of_the_wrong_shape_are_refused(tmp_path: Path, losses, message: str) -> None:
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=message):
        recorder.update(torch.arange(4), losses)


def test_extra_column_of_the_wrong_shape_and_float_ids_are_refused(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"'target' has shape \(3,\); expected \(4,\)"):
        recorder.update(torch.arange(4), torch.ones(4), target=torch.zeros(3))
    with pytest.raises(ActionScoresError, match=r"sample_ids must be integers, got dtype torch.float32"):
        recorder.update(torch.arange(4, dtype=torch.float32), torch.ones(4))


def test_num_samples_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match="num_samples must be positive, got 0"):
        LossRecorder("test", num_samples=0, local_dir=tmp_path)


def test_dict_of_parts_gives_part_columns_and_their_sum(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 7
    loc, cls = rng.random(n).astype(np.float32) * 3, rng.random(n).astype(np.float32)
    order = rng.permutation(n)
    recorder = LossRecorder("train", num_samples=n, local_dir=tmp_path)
    for ids in _batches(order, 3):
        recorder.update(torch.as_tensor(ids), {"loc": torch.as_tensor(loc[ids]), "cls": torch.as_tensor(cls[ids])})
    table = pq.read_table(recorder.end_epoch(0))
    assert set(table.column_names) == {"sample_id", "loss", "loss_loc", "loss_cls"}
    for column in ("loss", "loss_loc", "loss_cls"):
        assert table.schema.field(column).type == pa.float32()
    data = table.to_pydict()
    assert data["sample_id"] == list(range(n))
    assert data["loss_loc"] == [float(v) for v in loc]
    assert data["loss_cls"] == [float(v) for v in cls]
    expected = [float(np.float32(float(a) + float(b))) for a, b in zip(loc, cls)]
    assert data["loss"] == expected


def test_changing_parts_between_batches_is_refused(tmp_path: Path) -> None:
    recorder = LossRecorder("train", num_samples=6, local_dir=tmp_path)
    recorder.update(torch.tensor([0, 1]), {"loc": torch.ones(2), "cls": torch.ones(2)})
    with pytest.raises(ActionScoresError, match=r"loss parts changed from \['cls', 'loc'\] to \['loc'\]"):
        recorder.update(torch.tensor([2, 3]), {"loc": torch.ones(2)})
    with pytest.raises(ActionScoresError, match=r"expected a dict with parts \['cls', 'loc'\], got one tensor"):
        recorder.update(torch.tensor([2, 3]), torch.ones(2))


def test_extra_columns_are_stored_per_sample(tmp_path: Path) -> None:
    targets = np.array([4, 0, 9, 2, 7], dtype=np.int64)
    losses = np.array([0.1, 0.2, 0.3, 0.4, 0.5], dtype=np.float32)
    order = np.array([3, 0, 4, 1, 2])
    recorder = LossRecorder("test", num_samples=5, local_dir=tmp_path)
    for ids in _batches(order, 2):
        recorder.update(torch.as_tensor(ids), torch.as_tensor(losses[ids]), target=torch.as_tensor(targets[ids]))
    table = pq.read_table(recorder.end_epoch(0))
    assert table.schema.field("target").type == pa.int64()
    assert table.column("target").to_pylist() == targets.tolist()
    assert table.column("loss").to_pylist() == [float(v) for v in losses]
    with pytest.raises(ActionScoresError, match=r"extra column 'loss_x' clashes with a loss column"):
        recorder.update(torch.tensor([0]), torch.ones(1), loss_x=torch.ones(1))


def test_file_is_named_after_split_and_zero_padded_epoch(tmp_path: Path) -> None:
    recorder = LossRecorder("val-1", num_samples=2, local_dir=tmp_path)
    recorder.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    path = recorder.end_epoch(3)
    assert path == tmp_path / "per_sample_losses" / "val-1" / "epoch_0003.parquet"
    assert path.is_file()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "per_sample_losses/val-1/epoch_0003.parquet"
    ]


@pytest.mark.parametrize("split", ["../x", "a/b", "", ".hidden", "with space"])
def test_bad_split_names_are_refused(tmp_path: Path, split: str) -> None:
    with pytest.raises(ActionScoresError, match=rf"split name {re.escape(repr(split))} is not allowed"):
        LossRecorder(split, num_samples=3, local_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_end_epoch_resets_so_the_next_epoch_is_independent(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=3, local_dir=tmp_path)
    recorder.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    first = recorder.end_epoch(0)
    # Epoch 0's ids are forgotten: a partial epoch 1 is missing samples.
    recorder.update(torch.tensor([2]), torch.tensor([30.0]))
    with pytest.raises(ActionScoresError, match=r"^split 'test', epoch 1: 2 of 3 samples missing: \[0, 1\]$"):
        recorder.end_epoch(1)

    recorder = LossRecorder("test", num_samples=3, local_dir=tmp_path)
    recorder.update(torch.tensor([2, 0, 1]), torch.tensor([3.0, 1.0, 2.0]))
    recorder.end_epoch(0)
    recorder.update(torch.tensor([1, 2, 0]), torch.tensor([20.0, 30.0, 10.0]))
    second = recorder.end_epoch(1)
    assert _read(first) == {"sample_id": [0, 1, 2], "loss": [1.0, 2.0, 3.0]}
    assert _read(second) == {"sample_id": [0, 1, 2], "loss": [10.0, 20.0, 30.0]}


def test_a_refused_batch_leaves_no_trace(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"'target' has shape \(3,\)"):
        recorder.update(torch.arange(4), torch.full((4,), 9.0), target=torch.zeros(3))
    recorder.update(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), target=torch.zeros(4))
    assert _read(recorder.end_epoch(0))["loss"] == [1.0, 2.0, 3.0, 4.0]  # today: [9.0, 9.0, 9.0, 9.0]


def test_a_refused_first_batch_does_not_fix_the_loss_form(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=2, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"reduction='none'"):
        recorder.update(torch.arange(2), torch.tensor(1.0))
    recorder.update(torch.arange(2), {"cls": torch.tensor([1.0, 2.0])})
    assert _read(recorder.end_epoch(0))["loss_cls"] == [1.0, 2.0]


def test_bfloat16_losses_are_stored_as_float32(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=2, local_dir=tmp_path)
    recorder.update(torch.tensor([1, 0]), torch.tensor([2.0, 0.5], dtype=torch.bfloat16))
    table = pq.read_table(recorder.end_epoch(0))
    assert table.schema.field("loss").type == pa.float32()
    assert table.column("loss").to_pylist() == [0.5, 2.0]


def test_tables_are_logged_into_the_mlflow_run(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"recorder-{uuid.uuid4().hex[:8]}", run_name="recorder")
    try:
        recorder = LossRecorder("test", num_samples=4, tracker=tracker, local_dir=tmp_path / "local")
        for epoch in range(2):
            recorder.update(torch.tensor([3, 1]), torch.tensor([3.0, 1.0]) * (epoch + 1))
            recorder.update(torch.tensor([0, 2]), torch.tensor([0.0, 2.0]) * (epoch + 1))
            recorder.end_epoch(epoch)
    finally:
        tracker.finish()
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [info.path for info in client.list_artifacts(run_id)] == ["per_sample_losses"]
    names = [info.path for info in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert names == ["per_sample_losses/test/epoch_0000.parquet", "per_sample_losses/test/epoch_0001.parquet"]
    for epoch in range(2):
        local = client.download_artifacts(run_id, names[epoch], str(tmp_path / "down"))
        assert _read(Path(local)) == {"sample_id": [0, 1, 2, 3], "loss": [0.0, 1.0 * (epoch + 1), 2.0 * (epoch + 1), 3.0 * (epoch + 1)]}


def test_epochs_go_up_by_one_from_the_first_a_recorder_ends_and_a_skip_or_repeat_names_the_expected_one(
        tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=2, local_dir=tmp_path)
    recorder.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    assert recorder.end_epoch(5).name == "epoch_0005.parquet"  # a resumed process may start at any epoch
    recorder.update(torch.tensor([0, 1]), torch.tensor([3.0, 4.0]))
    skipped = (r"^split 'test': end_epoch\(7\) after epoch 5; expected end_epoch\(6\): a recorder ends each epoch "
               r"once, in order \(a resumed process makes a new recorder, whose first end_epoch may be any epoch\)$")
    with pytest.raises(ActionScoresError, match=skipped):
        recorder.end_epoch(7)
    with pytest.raises(ActionScoresError, match=r"^split 'test': end_epoch\(5\) after epoch 5; expected end_epoch\(6\)"):
        recorder.end_epoch(5)  # the same epoch again, with new data: would replace its table
    assert _read(tmp_path / "per_sample_losses/test/epoch_0005.parquet")["loss"] == [1.0, 2.0]
    assert _read(recorder.end_epoch(6))["loss"] == [3.0, 4.0]  # the refused calls kept the batches
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == ["epoch_0005.parquet", "epoch_0006.parquet"]


def test_a_second_end_epoch_without_a_new_batch_says_the_epoch_was_already_ended(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=2, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"^split 'test': no batch was recorded this epoch; call update\(\) "
                                                r"with the epoch's batches before end_epoch\(\)$"):
        recorder.end_epoch(0)
    recorder.update(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))
    recorder.end_epoch(0)
    already = (r"^split 'test': epoch 0 was already ended and no batch was recorded since; record the next epoch's "
               r"batches, then call end_epoch\(1\)$")
    for epoch in (0, 1):
        with pytest.raises(ActionScoresError, match=already):
            recorder.end_epoch(epoch)


def test_a_refused_epoch_keeps_its_batches_so_the_missing_ones_can_be_added(tmp_path: Path) -> None:
    recorder = LossRecorder("test", num_samples=3, local_dir=tmp_path)
    recorder.update(torch.tensor([0, 2]), torch.tensor([0.0, 2.0]))
    with pytest.raises(ActionScoresError, match=r"^split 'test', epoch 0: 1 of 3 samples missing: \[1\]$"):
        recorder.end_epoch(0)
    recorder.update(torch.tensor([1]), torch.tensor([1.0]))
    assert _read(recorder.end_epoch(0)) == {"sample_id": [0, 1, 2], "loss": [0.0, 1.0, 2.0]}

