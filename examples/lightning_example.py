"""Lightning (`import lightning as L`) on scikit-learn's digits: every test sample's loss each epoch, then analyse.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000        # or sqlite:///mlflow.db
    python examples/lightning_example.py --experiment lightning-digits
    python examples/lightning_example.py --experiment lightning-digits --devices 2 --strategy ddp   # 2 CPU processes
    python examples/lightning_example.py --logger wandb       # an offline W&B run (WANDB_MODE=offline)

The `LightningModule` is plain Lightning; the lines that add action scores are marked `# action-scores`.
The same callback works with the older `pytorch_lightning` package and its loggers.
Prints `run <id> finished` and where the panels are.
"""

from __future__ import annotations

import argparse

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tracking.integrations.lightning import ActionScoresCallback  # action-scores


class DigitsClassifier(L.LightningModule):
    """A small MLP on 8x8 digits."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_splits(test_size: int = 360) -> tuple[TensorDataset, TensorDataset, np.ndarray, np.ndarray]:
    """Train and test sets (a fixed permutation), plus the test images as uint8 and their labels."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = (digits.images[order] / 16 * 255).round().astype(np.uint8)
    x = torch.tensor(images[:, None] / 255, dtype=torch.float32)
    y = torch.tensor(digits.target[order])
    train = TensorDataset(x[test_size:], y[test_size:])
    test = TensorDataset(x[:test_size], y[:test_size])
    return train, test, images[:test_size], digits.target[order][:test_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="lightning-example")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--logger", choices=["mlflow", "wandb"], default="mlflow")
    parser.add_argument("--no-analyze", action="store_true", help="train only")
    args = parser.parse_args()

    L.seed_everything(0, workers=True)
    train, test, test_images, test_labels = digits_splits()
    logger = (MLFlowLogger(experiment_name=args.experiment) if args.logger == "mlflow"
              else WandbLogger(project=args.experiment, offline=True))
    scores = ActionScoresCallback(  # action-scores
        {"test": test},  # action-scores: scored by an eval pass after every epoch
        media={"test": {"images": test_images, "labels": [str(y) for y in test_labels]}},  # action-scores
    )
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices, strategy=args.strategy,
                        logger=logger, callbacks=[scores], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DigitsClassifier(), DataLoader(train, batch_size=64, shuffle=True))
    if not trainer.is_global_zero:
        return
    run = scores.run  # action-scores: where the tables went
    print(f"run {run.run_id} finished")
    if args.no_analyze:
        return
    if args.logger == "wandb":
        logger.experiment.finish()  # the job resumes the run
    run.analyze()  # action-scores: the post-hoc job, as `action-scores analyze` runs it


if __name__ == "__main__":
    main()
