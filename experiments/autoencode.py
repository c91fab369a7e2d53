"""The paper's unsupervised proposal: action scores of an autoencoder, no labels used in training.

    python -m experiments.autoencode                      # digits, 20 epochs, a few seconds a epoch on a CPU
    mlflow run . -e autoencode --env-manager local

A small fully connected autoencoder (64 -> 32 -> 8 -> 32 -> 64) on scikit-learn's 8x8 digits. Each sample's
loss is its summed squared reconstruction error (over pixels); its action is that loss summed over epochs.
The run records the tracked splits every epoch and names the digits data (action_scores.dataset), so
`action-scores analyze --run-id <id>` draws the hardest and easiest panels and browse.html from it; the
labels appear in captions only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from experiments.datasets import load_split
from experiments.loop import StepOutput, add_experiment_arguments, parse_track, train_and_record
from tracking import contract
from tracking.backends import make_tracker
from tracking.errors import ActionScoresError
from tracking.record import distributed


class DigitsAutoencoder(nn.Module):
    """64 -> hidden -> code -> hidden -> 64, ReLU between, a sigmoid out (inputs are scaled to [0, 1])."""

    def __init__(self, pixels: int = 64, hidden: int = 32, code: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, code), nn.ReLU(),
                                 nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, pixels), nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).view_as(images)


def reconstruction_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Per sample: the squared reconstruction error summed over its pixels. The target is never read."""
    images = batch["input"]
    losses = (model(images) - images).pow(2).flatten(1).sum(dim=1)
    return StepOutput(losses)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, epochs=20, batch_size=32, track="train,test")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = distributed.local_device()
    tracked_passes = parse_track(args.track, ["train", "test"])
    datasets = {name: load_split("digits", name).dataset for name in {"train", *tracked_passes}}
    model = DigitsAutoencoder().to(device)
    train_and_record(
        tracker=partial(make_tracker, args.tracker), experiment=args.experiment or None, run_name="autoencode-digits",
        params={"dataset": "digits", "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "seed": args.seed, "track": args.track, "model": "digits_autoencoder_64_32_8",
                "loss": "summed squared reconstruction error", "optimizer": "adam", "device": device.type,
                # the job's picture view of the digits (captions show the labels; training never reads them)
                contract.TASK_PARAM: "classification", contract.DATASET_PARAM: "digits"},
        model=model, step=reconstruction_step, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        datasets=datasets, tracked_passes=tracked_passes, epochs=args.epochs, batch_size=args.batch_size,
        seed=args.seed, device=device, num_workers=args.num_workers, save_model=args.save_model,
    )


if __name__ == "__main__":
    try:
        main()
    except ActionScoresError as error:
        sys.exit(f"autoencode: error: {error}")
