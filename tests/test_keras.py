"""Keras 3 on the torch backend against the real MLflow server and a real offline W&B run: the callback writes
into the script's active run, the tables are whole and are the model's per-sample loss, the scores are their
sums, the panels come from recorded media alone."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from tests.conftest import in_process_training  # noqa: E402
from tracking.analyze import analyze_run  # noqa: E402
from tracking.backends import MLflowTracker, WandbTracker  # noqa: E402
from tracking.errors import ActionScoresError  # noqa: E402
from tracking.integrations.keras import ActionScoresCallback  # noqa: E402
from tracking.report.panels import read_panel_rows  # noqa: E402

EPOCHS = 3
TRAIN, TEST = 240, 50


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[: TRAIN + TEST] / 16 * 255).round().astype(np.uint8)
    x, y = (images / 255).astype(np.float32).reshape(-1, 64), digits.target[: TRAIN + TEST]
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:], images[TRAIN:]


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model


@pytest.fixture(scope="module")
def recorded(mlflow_server: str) -> tuple[str, keras.Model]:
    """Keras training inside the script's own MLflow run, which also gets the script's epoch metrics."""
    x_train, y_train, x_test, y_test, images = _digits()
    model = _model()
    experiment = mlflow.MlflowClient(mlflow_server).create_experiment(f"keras-{uuid.uuid4().hex[:8]}")
    own_metrics = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: mlflow.log_metrics(logs, step=epoch))
    scores = ActionScoresCallback({"test": (x_test, y_test)}, batch_size=16,
                                  media={"test": {"images": images, "labels": [str(y) for y in y_test]}})
    with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as run:
        model.fit(x_train, y_train, epochs=EPOCHS, batch_size=32, verbose=0, callbacks=[own_metrics, scores])
    assert scores.run.run_id == run.info.run_id
    return run.info.run_id, model


def _tables(client: mlflow.MlflowClient, run_id: str, dst: Path) -> list[pd.DataFrame]:
    folder = Path(client.download_artifacts(run_id, "per_sample_losses/test", str(dst)))
    return [pd.read_parquet(path) for path in sorted(folder.glob("epoch_*.parquet"))]


def test_tables_are_whole_in_the_active_run_and_the_last_is_the_models_loss(
        recorded: tuple[str, keras.Model], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, model = recorded
    assert "loss" in client.get_run(run_id).data.metrics  # the script's own Keras metrics, same run
    tables = _tables(client, run_id, tmp_path)
    assert len(tables) == EPOCHS
    _, _, x_test, y_test, _ = _digits()
    for table in tables:
        assert table["sample_id"].tolist() == list(range(TEST))
        assert table["target"].tolist() == y_test.tolist()
    probabilities = np.asarray(model.predict(x_test, verbose=0), dtype=np.float64)
    p_true = probabilities[np.arange(TEST), y_test]
    np.testing.assert_allclose(tables[-1]["loss"].to_numpy(), -np.log(np.clip(p_true, 1e-7, 1)), rtol=1e-4)
    np.testing.assert_allclose(tables[-1]["p_true"].to_numpy(), p_true, rtol=1e-4, atol=1e-6)
    assert tables[-1]["correct"].tolist() == (probabilities.argmax(1) == y_test).tolist()


def test_scores_are_the_sums_and_panels_come_from_media_alone(
        recorded: tuple[str, keras.Model], mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, _ = recorded
    action = np.sum([t["loss"].to_numpy(np.float64) for t in _tables(client, run_id, tmp_path / "t")], axis=0)
    assert analyze_run(MLflowTracker(mlflow_server), run_id, top_k=5).status == "done"
    scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet", str(tmp_path)))
    np.testing.assert_allclose(scores.set_index("sample_id").sort_index()["action"].to_numpy(), action, rtol=1e-6)
    for name, order in (("hardest", -action), ("easiest", action)):
        expected = np.lexsort((np.arange(TEST), order))[:5].tolist()
        panel = client.download_artifacts(run_id, f"action_scores/test/loss/{name}.png", str(tmp_path))
        assert [i for row in read_panel_rows(panel) for i in row["sample_ids"]] == expected


def test_wandb_offline_run_gets_whole_tables(wandb_env: dict[str, str]) -> None:  # noqa: F811
    x_train, y_train, x_test, y_test, images = _digits()
    scores = ActionScoresCallback({"test": (x_test, y_test)}, tracker="wandb",
                                  media={"test": {"images": images, "labels": [str(y) for y in y_test]}})
    _model().fit(x_train, y_train, epochs=2, batch_size=32, verbose=0, callbacks=[scores])
    tracker = WandbTracker()
    tracker.attach(scores.run.target)
    assert tracker.list_files("per_sample_losses/test") == [
        f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(2)]
    for path in tracker.list_files("per_sample_losses/test"):
        assert pd.read_parquet(tracker.download(path, Path(wandb_env["WANDB_DIR"]) / "dl"))["sample_id"].tolist() \
            == list(range(TEST))
    assert tracker.list_files("per_sample_media/test") == ["per_sample_media/test/media.parquet"]


def test_bad_input_is_an_error_that_writes_nothing(mlflow_server: str, client: mlflow.MlflowClient) -> None:
    x_train, y_train, x_test, y_test, _ = _digits()
    with pytest.raises(ActionScoresError, match="one target per sample"):
        ActionScoresCallback({"test": (x_test, y_test[:-1])})
    with pytest.raises(ActionScoresError, match="nothing to record"):
        ActionScoresCallback({})
    reduced = ActionScoresCallback({"test": (x_test, y_test)},
                                   loss_fn=lambda p, y: keras.losses.SparseCategoricalCrossentropy()(y, p))
    experiment = client.create_experiment(f"keras-bad-{uuid.uuid4().hex[:8]}")
    with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as run:
        with pytest.raises(ActionScoresError, match="scalar"):
            _model().fit(x_train, y_train, epochs=1, batch_size=64, verbose=0, callbacks=[reduced])
    assert client.list_artifacts(run.info.run_id) == []
    assert client.get_run(run.info.run_id).data.params == {}


def test_loss_fn_takes_outputs_and_targets_and_old_spellings_warn(mlflow_server: str,
                                                                  client: mlflow.MlflowClient) -> None:
    x_train, y_train, x_test, y_test, _ = _digits()
    doubled = ActionScoresCallback({"doubled": (x_test, y_test)}, tracker="mlflow",
                                   loss_fn=lambda outputs, targets: 2 * keras.losses.sparse_categorical_crossentropy(
                                       targets, outputs))
    with pytest.warns(DeprecationWarning) as warned:
        old = ActionScoresCallback(tracked={"test": (x_test, y_test)}, tracker="mlflow",
                                   per_sample_loss=lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p))
    assert [str(w.message) for w in warned] == [
        "action-scores: ActionScoresCallback(tracked=...) is deprecated and will be removed in the next release; "
        "use ActionScoresCallback({'test': (x, y)}) (splits=)",
        "action-scores: per_sample_loss(y_true, y_pred) is deprecated and will be removed in the next release; "
        "use loss_fn(outputs, targets)"]
    experiment = client.create_experiment(f"keras-loss-fn-{uuid.uuid4().hex[:8]}")
    for callback, split, factor in ((doubled, "doubled", 2), (old, "test", 1)):  # one writer a run: see below
        model = _model()
        with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as run:
            model.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0, callbacks=[callback])
        p_true = np.asarray(model.predict(x_test, verbose=0), dtype=np.float64)[np.arange(TEST), y_test]
        assert callback.run.run_id == run.info.run_id
        folder = Path(client.download_artifacts(run.info.run_id, f"per_sample_losses/{split}"))
        np.testing.assert_allclose(pd.read_parquet(folder / "epoch_0000.parquet")["loss"].to_numpy(),
                                   -factor * np.log(np.clip(p_true, 1e-7, 1)), rtol=1e-4)


def test_two_callbacks_write_their_splits_into_one_run(mlflow_server: str, client: mlflow.MlflowClient,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two writers of one run in one process: each queues its writes in a spool folder of its own (the second in
    `mlflow-<run id>-writer2`), so neither overwrites the other's operations, and both end empty."""
    monkeypatch.setenv("ACTION_SCORES_SPOOL", str(tmp_path / "spool"))
    x_train, y_train, x_test, y_test, _ = _digits()
    first = ActionScoresCallback({"first": (x_test, y_test)}, tracker="mlflow")
    second = ActionScoresCallback({"second": (x_test, y_test)}, tracker="mlflow")
    experiment = client.create_experiment(f"keras-two-{uuid.uuid4().hex[:8]}")
    with in_process_training(mlflow_server), mlflow.start_run(experiment_id=experiment) as run:
        _model().fit(x_train, y_train, epochs=2, batch_size=64, verbose=0, callbacks=[first, second])
    for split in ("first", "second"):
        assert [f.path for f in client.list_artifacts(run.info.run_id, f"per_sample_losses/{split}")] == [
            f"per_sample_losses/{split}/epoch_{e:04d}.parquet" for e in range(2)]
    spools = sorted((tmp_path / "spool").iterdir())
    assert [folder.name for folder in spools] == [f"mlflow-{run.info.run_id}", f"mlflow-{run.info.run_id}-writer2"]
    for folder in spools:
        assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()) == [
            "run.json", "writer.lock"]  # every write done, every table gone once uploaded
