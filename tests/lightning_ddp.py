"""Two CPU processes (`strategy="ddp"`, gloo) with the Lightning package named on the command line:
`python tests/lightning_ddp.py pytorch_lightning <experiment>`. Lightning starts the second process by running
this file again. Prints `run <id>` on rank 0."""

from __future__ import annotations

import importlib
import sys

from torch.utils.data import DataLoader

from tests.test_lightning import TEST, _digits, tiny
from tracking.integrations.lightning import ActionScoresCallback
from tracking.record import IndexedDataset


def main(package_name: str, experiment: str) -> None:
    package = importlib.import_module(package_name)
    train, test, _, _ = _digits()
    callback = ActionScoresCallback({"test": test}, batch_size=TEST // 4)
    trainer = package.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                              logger=package.loggers.MLFlowLogger(experiment_name=experiment), callbacks=[callback],
                              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(tiny(package), DataLoader(IndexedDataset(train), batch_size=64))
    if trainer.is_global_zero:
        print(f"run {callback.run.run_id}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
