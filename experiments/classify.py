"""Train the paper's classifier and record per-sample losses of the tracked splits every epoch.

    mlflow run . -e classify --env-manager local                       # digits, no download
    python -m experiments.classify --dataset imagefolder --data-root /tmp/data/cifar10 --epochs 15

Writes to the run: per_sample_losses/<split>/epoch_EEEE.parquet every epoch (columns
sample_id, loss, target, correct, p_true, margin, el2n), per-epoch metrics, and the params the post-hoc job
needs to rebuild images (action_scores.dataset, action_scores.data_root). Then run
`action-scores analyze --run-id <id>` (or `mlflow run . -e analyze -P run_id=<id>`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from experiments.loop import StepOutput, add_experiment_arguments, parse_track, train_and_record
from experiments.models import KerasCifarCNN
from tracking import contract
from tracking.record import distributed
from experiments.datasets import DATASETS, load_split
from tracking.errors import ActionScoresError
from tracking.record import classification_columns
from tracking.backends import make_tracker


def classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Cross-entropy per sample, plus the label and what the dynamics scores need from the same logits
    (whether the prediction was right, p of the true class, margin, EL2N)."""
    logits = model(batch["input"])
    losses = F.cross_entropy(logits, batch["target"], reduction="none")
    return StepOutput(losses, {"target": batch["target"], **classification_columns(logits, batch["target"])})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    add_experiment_arguments(parser, epochs=20, batch_size=32, track="test")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = distributed.local_device()  # under torchrun: this rank's GPU
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    tracked_passes = parse_track(args.track, ["train", "test"])
    splits = {name: load_split(args.dataset, name, data_root) for name in {"train", *tracked_passes}}
    channels, height, _ = splits["train"].dataset[0][0].shape
    model = KerasCifarCNN(channels, len(splits["train"].class_names), height).to(device)
    train_and_record(
        tracker=partial(make_tracker, args.tracker), experiment=args.experiment or None, run_name=f"classify-{args.dataset}",
        params={
            "dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "track": args.track,
            "model": "keras_cifar10_cnn", "optimizer": "adam", "device": device.type,
            contract.TASK_PARAM: "classification", contract.DATASET_PARAM: args.dataset,
            contract.DATA_ROOT_PARAM: data_root or "",
        },
        model=model, step=classification_step, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        datasets={name: split.dataset for name, split in splits.items()}, tracked_passes=tracked_passes,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=device,
        num_workers=args.num_workers, save_model=args.save_model,
    )


if __name__ == "__main__":
    try:
        main()
    except ActionScoresError as error:
        sys.exit(f"classify: error: {error}")
