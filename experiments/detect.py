"""Train an SSD detector and record every image's loss parts (loc, pos, neg) each epoch.

    mlflow run . -e detect --env-manager local                          # tiny SSD on digit-scenes, no download
    python -m experiments.detect --dataset voc2007 --data-root /tmp/data/voc --model ssd300 --epochs 10

Writes to the run: per_sample_losses/<split>/epoch_EEEE.parquet every epoch with
`loss` (= loss_loc + loss_pos + loss_neg, the objective the optimiser minimises, per
image) and `num_objects`; then `action-scores analyze --run-id <id>` gives an action per
part and box-drawn panels. Parts are normalised per image (see tracking/ssd.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.utils.data import Subset

from experiments.loop import StepOutput, add_experiment_arguments, parse_track, train_and_record
from experiments.models import ssd300, tiny_ssd
from tracking import contract
from tracking.record import distributed
from experiments.detection_data import DETECTION_DATASETS, detection_collate, load_detection_split
from tracking.errors import ActionScoresError
from experiments.ssd_loss import ssd_per_image_losses
from tracking.backends import make_tracker

SPLITS = ["train", "val"]


def detection_step(model: nn.Module, batch: dict) -> StepOutput:
    """SSD's loss split per image into loc / pos / neg, plus each image's number of objects."""
    parts = ssd_per_image_losses(model, batch["input"], batch["target"])
    objects = torch.tensor([len(t["labels"]) for t in batch["target"]], dtype=torch.int32)
    return StepOutput(parts, {"num_objects": objects})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digit-scenes", choices=sorted(DETECTION_DATASETS))
    parser.add_argument("--model", default="tiny", choices=["tiny", "ssd300"])
    parser.add_argument("--weights", default="", help="local state dict for ssd300 (nothing is downloaded)")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N images of each split (0 = all); ids stay those of the full split")
    add_experiment_arguments(parser, epochs=10, batch_size=16, track="val")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = distributed.local_device()  # under torchrun: this rank's GPU
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    tracked_passes = parse_track(args.track, SPLITS)
    splits = {name: load_detection_split(args.dataset, name, data_root) for name in {"train", *tracked_passes}}
    num_classes = len(splits["train"].class_names)
    model = (ssd300(num_classes, args.weights or None) if args.model == "ssd300" else tiny_ssd(num_classes)).to(device)
    train_and_record(
        tracker=partial(make_tracker, args.tracker), experiment=args.experiment or None, run_name=f"detect-{args.dataset}-{args.model}",
        params={
            "dataset": args.dataset, "data_root": args.data_root, "model": args.model, "weights": args.weights,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "track": args.track, "limit": args.limit, "optimizer": "adam", "device": device.type,
            contract.TASK_PARAM: "detection", contract.DATASET_PARAM: args.dataset,
            contract.DATA_ROOT_PARAM: data_root or "",
        },
        model=model, step=detection_step, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        datasets={name: Subset(split.dataset, range(min(args.limit, len(split.dataset)))) if args.limit
                  else split.dataset for name, split in splits.items()},
        tracked_passes=tracked_passes,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=device,
        collate_fn=detection_collate, num_workers=args.num_workers, save_model=args.save_model,
    )


if __name__ == "__main__":
    try:
        main()
    except ActionScoresError as error:
        sys.exit(f"detect: error: {error}")
