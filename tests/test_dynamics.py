"""The training-dynamics scores (Cartography, forgetting, AUM, EL2N) of a real recorded digits run on the
real MLflow server, against reference implementations fed the very logits the loss used."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from aum import AUMCalculator

from experiments.classify import classification_step
from experiments.loop import train_and_record
from experiments.models import KerasCifarCNN
from tests.conftest import in_process_training
from tracking.analyze import analyze_run
from experiments.datasets import load_split
from tracking.backends import MLflowTracker

EPOCHS = 3
EL2N_EPOCH = 1


class Recorded:
    """One digits run with its train split tracked by the training pass, plus what the test saw."""

    run_id: str
    aum_values: pd.DataFrame  # the aum package's AUMCalculator, fed every batch's logits
    logits: list[dict[int, np.ndarray]]  # epoch -> sample id -> logits the loss used
    targets: np.ndarray
    scores: pd.DataFrame
    tables: list[pd.DataFrame]  # the run's per-epoch tables, read with pandas, indexed by sample_id
    message: str


@pytest.fixture(scope="module")
def recorded(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    tmp = tmp_path_factory.mktemp("dynamics")
    torch.manual_seed(0)
    train = load_split("digits", "train", None)
    model = KerasCifarCNN(1, len(train.class_names), 8)
    seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.detach().clone()))
    calculator = AUMCalculator(str(tmp / "aum"), compressed=True)
    logits: list[dict[int, np.ndarray]] = []
    count = 0

    def step(net: torch.nn.Module, batch: dict[str, torch.Tensor]):
        nonlocal count
        out = classification_step(net, batch)
        batch_logits = seen.pop()
        ids = batch["sample_id"].tolist()
        calculator.update(batch_logits, batch["target"], ids)
        if count % len(train.labels) == 0:
            logits.append({})
        logits[-1].update(zip(ids, batch_logits.numpy()))
        count += len(ids)
        return out

    tracker = MLflowTracker(mlflow_server)
    with in_process_training(mlflow_server):
        train_and_record(
            tracker=lambda: tracker, experiment=f"dynamics-{uuid.uuid4().hex[:8]}", run_name="dynamics",
            params={"action_scores.task": "classification"}, model=model, step=step,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), datasets={"train": train.dataset},
            tracked_passes={"train": "train"}, epochs=EPOCHS, batch_size=64, seed=0, device=torch.device("cpu"),
        )
    calculator.finalize()
    result = Recorded()
    result.run_id = tracker.run_id
    result.aum_values = pd.read_csv(tmp / "aum" / "aum_values.csv").set_index("sample_id").sort_index()
    result.logits = logits
    result.targets = train.labels
    result.message = analyze_run(MLflowTracker(mlflow_server), tracker.run_id, panels=False,
                                 el2n_epoch=EL2N_EPOCH).message
    client = mlflow.MlflowClient(mlflow_server)
    result.scores = pd.read_parquet(client.download_artifacts(
        tracker.run_id, "action_scores/train/scores.parquet", str(tmp / "scores"))).set_index("sample_id")
    folder = Path(client.download_artifacts(tracker.run_id, "per_sample_losses/train", str(tmp / "tables")))
    result.tables = [pd.read_parquet(p).set_index("sample_id").sort_index() for p in sorted(folder.glob("*.parquet"))]
    return result


def test_run_records_the_columns_from_the_logits_the_loss_used(recorded: Recorded) -> None:
    assert len(recorded.tables) == len(recorded.logits) == EPOCHS
    for table, logits in zip(recorded.tables, recorded.logits):
        assert list(table.columns) == ["loss", "target", "correct", "p_true", "margin", "el2n", "prediction"]
        ids = table.index.to_numpy()
        z = np.stack([logits[i] for i in ids]).astype(np.float64)
        y = recorded.targets[ids]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        rows = np.arange(len(ids))
        np.testing.assert_allclose(table["p_true"], p[rows, y], rtol=1e-5, atol=1e-6)
        others = z.copy()
        others[rows, y] = -np.inf
        np.testing.assert_allclose(table["margin"], z[rows, y] - others.max(axis=1), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(table["correct"], z.argmax(axis=1) == y)
        np.testing.assert_array_equal(table["prediction"], z.argmax(axis=1))
        np.testing.assert_allclose(table["loss"], -np.log(p[rows, y]), rtol=1e-4, atol=1e-5)
    assert recorded.message == ""  # every score computed: nothing left out


def test_aum_equals_the_aum_package(recorded: Recorded) -> None:
    reference = recorded.aum_values["aum"].reindex(recorded.scores.index)
    assert not reference.isna().any()
    np.testing.assert_allclose(recorded.scores["aum"], reference, rtol=1e-5, atol=1e-5)
    # A trained-for-3-epochs CNN: margins spread over both signs, so a wrong sign or offset would show.
    assert recorded.scores["aum"].min() < 0 < recorded.scores["aum"].max()
    print(f"aum vs aum package: max abs diff {np.abs(recorded.scores['aum'] - reference).max():.2e}, "
          f"mean aum {reference.mean():.4f}")


def test_cartography_scores_equal_its_formulas(recorded: Recorded) -> None:
    p_true = np.stack([t["p_true"].to_numpy(np.float64) for t in recorded.tables])  # [epochs, samples]
    correct = np.stack([t["correct"].to_numpy(bool) for t in recorded.tables])
    # Cartography (train_dy_filtering.compute_train_dy_metrics): np.mean / np.std (ddof 0) of the
    # true-class probabilities over epochs, and the mean of per-epoch correctness.
    np.testing.assert_allclose(recorded.scores["confidence"], np.mean(p_true, axis=0), rtol=1e-12)
    np.testing.assert_allclose(recorded.scores["variability"], np.std(p_true, axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(recorded.scores["correctness"], correct.mean(axis=0), rtol=1e-12)
    assert recorded.scores["variability"].max() > 0.1  # the model changed its mind on some samples
    print(f"cartography: mean confidence {recorded.scores['confidence'].mean():.4f}, "
          f"mean variability {recorded.scores['variability'].mean():.4f}")


def test_forgetting_equals_a_plain_count(recorded: Recorded) -> None:
    correct = np.stack([t["correct"].to_numpy(bool) for t in recorded.tables])
    expected = []
    for column in correct.T:
        history = [bool(c) for c in column]
        events = sum(1 for before, after in zip(history, history[1:]) if before and not after)
        expected.append(events if any(history) else EPOCHS)
    assert recorded.scores["forgetting"].tolist() == expected
    assert (recorded.scores["forgetting"] == EPOCHS).any()  # some samples never learned in 3 epochs


def test_el2n_is_taken_at_the_chosen_epoch(recorded: Recorded) -> None:
    logits = recorded.logits[EL2N_EPOCH]
    expected = []
    for sample_id in recorded.scores.index:
        z = logits[sample_id].astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        p[recorded.targets[sample_id]] -= 1.0
        expected.append(np.linalg.norm(p))
    np.testing.assert_allclose(recorded.scores["el2n"], expected, rtol=1e-5, atol=1e-6)


def test_action_and_mean_loss_still_the_sums(recorded: Recorded) -> None:
    total = sum(t["loss"].to_numpy(np.float64) for t in recorded.tables)
    np.testing.assert_allclose(recorded.scores["action"], total, rtol=1e-12)
    np.testing.assert_allclose(recorded.scores["mean_loss"], total / EPOCHS, rtol=1e-12)


# --- runs and tables without the columns, and bad ones ------------------------------------


def _write(path: Path, **columns: object) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def test_old_run_without_the_columns_leaves_the_scores_out_and_says_why(mlflow_server: str, tmp_path: Path) -> None:
    client = mlflow.MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment(f"old-{uuid.uuid4().hex[:8]}")).info.run_id
    folder = tmp_path / "per_sample_losses" / "test"
    folder.mkdir(parents=True)
    for epoch in range(2):
        _write(folder / f"epoch_{epoch:04d}.parquet", sample_id=pa.array([0, 1, 2], pa.int64()),
               loss=pa.array([1.0, 2.0, 3.0], pa.float32()), correct=pa.array([True, False, epoch == 1]))
    client.log_artifacts(run_id, str(tmp_path))
    client.set_terminated(run_id)
    result = analyze_run(MLflowTracker(mlflow_server), run_id)
    scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet", str(tmp_path / "s")))
    assert list(scores.columns) == ["sample_id", "epochs", "action", "mean_loss", "correctness", "forgetting", "rank"]
    assert scores["correctness"].tolist() == [1.0, 0.0, 0.5]
    assert scores["forgetting"].tolist() == [0, 2, 0]  # sample 1 never learned: the number of epochs
    assert "no confidence, variability: the tables have no 'p_true' column" in result.message
    assert "no aum: the tables have no 'margin' column" in result.message
    assert "no el2n: the tables have no 'el2n' column" in result.message
