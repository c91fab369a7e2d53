"""Lightning against the real MLflow server: the callback writes into the MLFlowLogger's run, the tables are
whole, the scores are their sums, the panels come from recorded media; DDP with 2 processes. Both packages,
`lightning.pytorch` and `pytorch_lightning`, installed side by side, each with its own Trainer and loggers."""

from __future__ import annotations

import importlib
import sys
import threading
import uuid
from pathlib import Path
from types import ModuleType

import lightning.pytorch as pl
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import ROOT, in_process_training, run_command, sharded_epochs
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker, WandbTracker
from tracking.errors import ActionScoresError
from tracking.integrations.lightning import PACKAGES, ActionScoresCallback
from tracking.record import IndexedDataset
from tracking.report.panels import read_panel_rows

EPOCHS = 3
TRAIN, TEST = 240, 60


class _TinyBody:
    """A linear model on 8x8 digits whose training_step hands over per-sample losses and ids (training pass);
    a LightningModule of either package with `tiny`."""

    def __init__(self, hand_over: str = "losses") -> None:
        super().__init__()
        self.hand_over = hand_over
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> object:
        losses = F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")
        self.log("train_loss", losses.mean(), on_epoch=True, on_step=False)
        if self.hand_over == "scalar":
            return {"loss": losses.mean(), "losses": losses.mean(), "sample_id": batch["sample_id"]}
        if self.hand_over == "no ids":
            return losses.mean()
        return {"loss": losses.mean(), "losses": losses, "sample_id": batch["sample_id"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def tiny(package: ModuleType, hand_over: str = "losses") -> object:
    """The tiny model as a LightningModule of `package` (each Trainer takes only its own package's modules)."""
    return type("TinyClassifier", (_TinyBody, package.LightningModule), {})(hand_over)


TinyClassifier = type("TinyClassifier", (_TinyBody, pl.LightningModule), {})


def _digits() -> tuple[TensorDataset, TensorDataset, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[: TRAIN + TEST] / 16 * 255).round().astype(np.uint8)
    x = torch.tensor(images[:, None] / 255, dtype=torch.float32)
    y = torch.tensor(digits.target[: TRAIN + TEST])
    return TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:]), images[TRAIN:], y[TRAIN:].numpy()


def _fit(uri: str, module: object, callback: ActionScoresCallback, epochs: int = EPOCHS,
         package: ModuleType = pl, logger: object = None) -> object:
    """Fit `module` with `package`'s Trainer; `logger` defaults to that package's MLFlowLogger on `uri`."""
    train, _, _, _ = _digits()
    if logger is None:
        logger = package.loggers.MLFlowLogger(experiment_name=f"lightning-{uuid.uuid4().hex[:8]}", tracking_uri=uri)
    trainer = package.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                              log_every_n_steps=1)
    torch.manual_seed(0)
    with in_process_training(uri):
        trainer.fit(module, DataLoader(IndexedDataset(train), batch_size=32, shuffle=True))
    return logger


def _tables(client: mlflow.MlflowClient, run_id: str, split: str, dst: Path) -> list[pd.DataFrame]:
    folder = Path(client.download_artifacts(run_id, f"per_sample_losses/{split}", str(dst)))
    return [pd.read_parquet(path) for path in sorted(folder.glob("epoch_*.parquet"))]


@pytest.fixture(scope="module")
def recorded(mlflow_server: str) -> tuple[str, TinyClassifier]:
    """One Lightning run: the test split by the eval pass (with media), the train split by the training pass."""
    _, test, test_images, test_labels = _digits()
    module = TinyClassifier()
    callback = ActionScoresCallback({"test": test}, train_split="train", batch_size=16,
                                    media={"test": {"images": test_images, "labels": [str(y) for y in test_labels]}})
    logger = _fit(mlflow_server, module, callback)
    assert callback.run is not None and callback.run.run_id == logger.run_id
    return logger.run_id, module


def test_tables_are_whole_in_the_loggers_run_and_the_eval_pass_is_the_models_loss(
        recorded: tuple[str, TinyClassifier], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, module = recorded
    run = client.get_run(run_id)
    assert "train_loss_epoch" in run.data.metrics or "train_loss" in run.data.metrics  # Lightning's own metric
    assert run.data.params["action_scores.scored_by.test"] == "eval"
    assert run.data.params["action_scores.scored_by.train"] == "train"
    for split, size in (("test", TEST), ("train", TRAIN)):
        tables = _tables(client, run_id, split, tmp_path / split)
        assert len(tables) == EPOCHS
        for table in tables:
            assert table["sample_id"].tolist() == list(range(size))
            assert np.isfinite(table["loss"]).all()
    # The last eval-pass table is the trained model's cross-entropy on the test set, sample by sample.
    _, test, _, _ = _digits()
    module.eval()
    with torch.no_grad():
        expected = F.cross_entropy(module(test.tensors[0]), test.tensors[1], reduction="none").numpy()
    last = _tables(client, run_id, "test", tmp_path / "again")[-1]
    np.testing.assert_allclose(last["loss"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert last["target"].tolist() == test.tensors[1].tolist()


def test_scores_are_the_sums_and_panels_come_from_media_alone(
        recorded: tuple[str, TinyClassifier], mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    run_id, _ = recorded
    tables = _tables(client, run_id, "test", tmp_path / "tables")
    action = np.sum([t["loss"].to_numpy(np.float64) for t in tables], axis=0)  # ids are 0..n-1 in every table
    # No dataset param, no data on disk: the panels can only come from the recorded media.
    result = analyze_run(MLflowTracker(mlflow_server), run_id, top_k=5)
    assert result.status == "done"
    scores = pd.read_parquet(client.download_artifacts(run_id, "action_scores/test/scores.parquet", str(tmp_path)))
    np.testing.assert_allclose(scores.set_index("sample_id").sort_index()["action"].to_numpy(), action, rtol=1e-6)
    hardest = np.lexsort((np.arange(TEST), -action))[:5].tolist()  # highest action first, ties by lower id
    easiest = np.lexsort((np.arange(TEST), action))[:5].tolist()
    for name, expected in (("hardest", hardest), ("easiest", easiest)):
        panel = client.download_artifacts(run_id, f"action_scores/test/loss/{name}.png", str(tmp_path))
        assert [i for row in read_panel_rows(panel) for i in row["sample_ids"]] == expected


def test_ddp_two_processes_write_a_part_each_per_epoch_into_the_loggers_run(
        tracking_env: dict[str, str], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = f"lightning-ddp-{uuid.uuid4().hex[:8]}"
    out = run_command([sys.executable, str(ROOT / "examples" / "lightning_example.py"), "--experiment", experiment,
                       "--epochs", str(EPOCHS), "--devices", "2", "--strategy", "ddp", "--no-analyze"],
                      dict(tracking_env, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"), cwd=tmp_path)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1  # rank 1 opened nothing
    run_id = runs[0].info.run_id
    assert f"run {run_id} finished" in out.stdout
    assert "train_loss_epoch" in runs[0].data.metrics or "train_loss" in runs[0].data.metrics
    folders = [f.path for f in client.list_artifacts(run_id, "per_sample_losses/test")]
    assert folders == [f"per_sample_losses/test/epoch_{e:04d}" for e in range(EPOCHS)]
    epochs = sharded_epochs(client, run_id, "test", tmp_path / "tables")  # one sorted part per rank
    assert [table["sample_id"].tolist() for table in epochs] == [list(range(360))] * EPOCHS  # their union


def test_wandb_logger_run_gets_the_tables(wandb_env: dict[str, str]) -> None:  # noqa: F811
    _, test, _, _ = _digits()
    train, _, _, _ = _digits()
    logger = WandbLogger(project=wandb_env["WANDB_PROJECT"], offline=True)
    callback = ActionScoresCallback({"test": test})
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyClassifier(), DataLoader(IndexedDataset(train), batch_size=64))
    assert callback.run.run_id == logger.experiment.id  # the logger's own run
    # The fit's end waited for the last table's copy, and no thread of it outlives the fit.
    assert [t.name for t in threading.enumerate() if t.name.endswith(f"-wandb-{logger.experiment.id}")] == []
    logger.experiment.finish()
    tracker = WandbTracker()
    tracker.attach(callback.run.target)
    paths = tracker.list_files("per_sample_losses/test")
    assert paths == [f"per_sample_losses/test/epoch_{e:04d}.parquet" for e in range(2)]
    for path in paths:
        table = pd.read_parquet(tracker.download(path, Path(wandb_env["WANDB_DIR"]) / "dl"))
        assert table["sample_id"].tolist() == list(range(TEST))


def test_bad_hand_over_is_an_error_that_writes_nothing(mlflow_server: str, client: mlflow.MlflowClient) -> None:
    for hand_over, message in (("scalar", "scalar"), ("no ids", "sample_id")):
        callback = ActionScoresCallback(train_split="train")
        with pytest.raises(ActionScoresError, match=message):
            _fit(mlflow_server, TinyClassifier(hand_over), callback, epochs=1)
        run_id = callback.run.run_id
        assert client.list_artifacts(run_id) == []
        assert not any(key.startswith("action_scores") for key in client.get_run(run_id).data.params)


def test_bad_media_and_arguments_fail_before_training(mlflow_server: str, client: mlflow.MlflowClient) -> None:
    _, test, images, _ = _digits()
    callback = ActionScoresCallback({"test": test}, media={"test": {"images": images / 255.0}})  # floats
    with pytest.raises(ActionScoresError, match="uint8"):
        _fit(mlflow_server, TinyClassifier(), callback, epochs=1)
    assert client.list_artifacts(callback.run.run_id) == []
    with pytest.raises(ActionScoresError, match="nothing to record"):
        ActionScoresCallback()
    with pytest.raises(ActionScoresError, match="pass the dataset itself"):
        ActionScoresCallback({"test": DataLoader(test)})
    with pytest.raises(ActionScoresError, match="not tracked"):
        ActionScoresCallback({"test": test}, media={"val": {"images": images}})


@pytest.fixture(params=PACKAGES)
def package(request: pytest.FixtureRequest) -> ModuleType:
    """`lightning.pytorch` and `pytorch_lightning`, both installed here."""
    return importlib.import_module(request.param)


def _run_count(client: mlflow.MlflowClient) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, max_results=50000))


def test_each_packages_trainer_and_mlflow_logger_get_the_tables(
        package: ModuleType, mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    _, test, _, _ = _digits()
    callback = ActionScoresCallback({"test": test})
    assert isinstance(callback, package.Callback)  # each Trainer checks its own package's Callback
    logger = _fit(mlflow_server, tiny(package), callback, epochs=2, package=package)
    assert callback.run.run_id == logger.run_id
    tables = _tables(client, logger.run_id, "test", tmp_path)
    assert [t["sample_id"].tolist() for t in tables] == [list(range(TEST))] * 2


def test_each_packages_wandb_logger_is_recognised(package: ModuleType, wandb_env: dict[str, str]) -> None:
    _, test, _, _ = _digits()
    logger = package.loggers.WandbLogger(project=wandb_env["WANDB_PROJECT"], offline=True)
    callback = ActionScoresCallback({"test": test})
    trainer = package.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny(package), DataLoader(IndexedDataset(_digits()[0]), batch_size=64))
    assert callback.run.run_id == logger.experiment.id
    logger.experiment.finish()


def test_an_unknown_logger_is_refused_and_no_run_is_opened(
        package: ModuleType, mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    _, test, _, _ = _digits()
    before = _run_count(client)
    callback = ActionScoresCallback({"test": test})
    with pytest.raises(ActionScoresError) as refused:
        _fit(mlflow_server, tiny(package), callback, epochs=1, package=package,
             logger=package.loggers.CSVLogger(str(tmp_path)))
    assert str(refused.value) == (
        "the trainer logs to ['CSVLogger'], and action-scores writes only into an MLflow or W&B run: add an "
        "MLFlowLogger or WandbLogger to the Trainer, or pass ActionScoresCallback(..., tracker='mlflow') (a run of "
        "its own) or tracker=<a configured tracking.backends Tracker>")
    assert callback.run is None
    assert _run_count(client) == before


def test_tracker_takes_a_name_or_a_configured_tracker(mlflow_server: str, client: mlflow.MlflowClient,
                                                      tmp_path: Path) -> None:
    _, test, _, _ = _digits()
    experiment = f"lightning-own-{uuid.uuid4().hex[:8]}"
    by_name = ActionScoresCallback({"test": test}, tracker="mlflow", experiment=experiment)
    _fit(mlflow_server, tiny(pl), by_name, epochs=1, logger=pl.loggers.CSVLogger(str(tmp_path)))
    named = client.get_run(by_name.run.run_id)
    assert (named.info.status, client.get_experiment(named.info.experiment_id).name) == ("FINISHED", experiment)

    unstarted = MLflowTracker(mlflow_server)  # started by the callback into its experiment, and finished by it
    configured = ActionScoresCallback({"test": test}, tracker=unstarted, experiment=experiment)
    _fit(mlflow_server, tiny(pl), configured, epochs=1, logger=False)
    assert client.get_run(unstarted.run_id).info.status == "FINISHED"

    started = MLflowTracker(mlflow_server)  # the user's run: written into, beside an MLFlowLogger, left open
    with in_process_training(mlflow_server):
        started.start(experiment=experiment)
        mine = ActionScoresCallback({"test": test}, tracker=started)
        logger = _fit(mlflow_server, tiny(pl), mine, epochs=1)
        assert mine.run.run_id == started.run_id != logger.run_id
        assert client.get_run(started.run_id).info.status == "RUNNING"
        started.finish()
    assert [f.path for f in client.list_artifacts(started.run_id, "per_sample_losses/test")] == [
        "per_sample_losses/test/epoch_0000.parquet"]
    assert client.get_run(started.run_id).info.status == "FINISHED"


def test_ddp_with_pytorch_lightning_writes_a_part_per_rank_and_epoch(
        tracking_env: dict[str, str], client: mlflow.MlflowClient, tmp_path: Path) -> None:
    experiment = f"pl-ddp-{uuid.uuid4().hex[:8]}"
    out = run_command([sys.executable, str(ROOT / "tests" / "lightning_ddp.py"), "pytorch_lightning", experiment],
                      tracking_env, cwd=tmp_path)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    assert f"run {runs[0].info.run_id}" in out.stdout
    tables = sharded_epochs(client, runs[0].info.run_id, "test", tmp_path / "tables")
    assert [t["sample_id"].tolist() for t in tables] == [list(range(TEST))] * 2


def test_loss_fn_takes_outputs_and_targets_and_old_spellings_warn(
        mlflow_server: str, client: mlflow.MlflowClient, tmp_path: Path) -> None:
    _, test, _, _ = _digits()
    halved = ActionScoresCallback({"test": test}, loss_fn=lambda outputs, targets: F.cross_entropy(
        outputs, targets, reduction="none") / 2)
    module = tiny(pl)
    logger = _fit(mlflow_server, module, halved, epochs=1)
    module.eval()
    with torch.no_grad():
        expected = F.cross_entropy(module(test.tensors[0]), test.tensors[1], reduction="none").numpy() / 2
    table = _tables(client, logger.run_id, "test", tmp_path)[0]
    np.testing.assert_allclose(table["loss"].to_numpy(), expected, rtol=1e-5, atol=1e-6)

    with pytest.warns(DeprecationWarning) as warned:
        old = ActionScoresCallback(eval_sets={"test": test},
                                   per_sample_loss=lambda module, batch: F.cross_entropy(module(batch[0]), batch[1],
                                                                                         reduction="none"))
    assert [str(w.message) for w in warned] == [
        "action-scores: ActionScoresCallback(eval_sets=...) is deprecated and will be removed in the next release; "
        "use ActionScoresCallback({'test': dataset}) (splits=)",
        "action-scores: per_sample_loss(module, batch) is deprecated and will be removed in the next release; "
        "use loss_fn(outputs, targets)"]
    logger = _fit(mlflow_server, tiny(pl), old, epochs=1)
    assert _tables(client, logger.run_id, "test", tmp_path / "old")[0]["sample_id"].tolist() == list(range(TEST))


def test_an_eval_batch_of_another_shape_names_the_fix(mlflow_server: str) -> None:
    _, test, _, _ = _digits()
    callback = ActionScoresCallback({"test": test}, collate_fn=lambda items: [item[0] for item in items])
    with pytest.raises(ActionScoresError, match=r"an eval batch is a list; the eval pass takes \(input, target\)"):
        _fit(mlflow_server, tiny(pl), callback, epochs=1)
