"""Train the paper's classifier and record per-sample losses of the tracked splits every epoch.

    mlflow run . -e classify --env-manager local                       # digits, no download
    python -m experiments.classify --dataset imagefolder --data-root /tmp/data/cifar10 --epochs 15

Writes to the run: per_sample_losses/<split>/epoch_EEEE.parquet every epoch (columns
sample_id, loss, target, correct, p_true, margin, el2n, prediction), per-epoch metrics, each tracked split's pictures and label names once
(per_sample_media/<split>/media.parquet, what the panels show), and the dataset's params. Then run
`action-scores analyze --run-id <id>` (or `mlflow run . -e analyze -P run_id=<id>`).

After `action-scores select --run-id <id>`: `--exclude <id>` trains without that run's latest selection
of `--selection-split` (ids keep their meaning: the left-out ids are absent from the tables),
`--relabel <id>` with its suggested labels; tags name the source run and the selection file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from experiments.loop import StepOutput, add_experiment_arguments, parse_track, train_and_record
from experiments.models import KerasCifarCNN
from tracking import contract
from tracking.record import distributed
from experiments.datasets import DATASETS, SPLITS, load_split, record_split_media, select_samples
from tracking.errors import ActionScoresError
from tracking.record import classification_columns
from tracking.backends import Tracker, make_tracker
from tracking.selection import SOURCE_FILE_TAG, SOURCE_RUN_TAG, SUGGESTED_LABEL, latest_selection


def classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    """Cross-entropy per sample, plus the label and what the dynamics scores need from the same logits
    (whether the prediction was right, p of the true class, margin, EL2N)."""
    logits = model(batch["input"])
    losses = F.cross_entropy(logits, batch["target"], reduction="none")
    return StepOutput(losses, {"target": batch["target"], **classification_columns(logits, batch["target"])})


@dataclass
class FromSelections:
    """What a run takes from other runs' selections: ids to leave out, labels to replace, tags saying so."""

    exclude: list[int] = field(default_factory=list)
    new_labels: dict[int, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def from_selections(tracker: Tracker, split: str, exclude: str = "", relabel: str = "") -> FromSelections:
    """The latest selection of `split` in run `exclude` (its ids) and in run `relabel` (its suggested labels)."""
    taken = FromSelections()
    for use, run_id in (("exclude", exclude), ("relabel", relabel)):
        if not run_id:
            continue
        path, table = latest_selection(tracker, run_id, split)
        if use == "exclude":
            taken.exclude = table[contract.SAMPLE_ID].astype(int).tolist()
        else:
            suggested = table.dropna(subset=[SUGGESTED_LABEL])
            taken.new_labels = dict(zip(suggested[contract.SAMPLE_ID].astype(int),
                                        suggested[SUGGESTED_LABEL].astype(int)))
        taken.tags |= {SOURCE_RUN_TAG.format(use=use): tracker.run_id, SOURCE_FILE_TAG.format(use=use): path,
                       f"action_scores.selection.{use}.samples": str(len(table) if use == "exclude"
                                                                     else len(taken.new_labels))}
    return taken


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    add_experiment_arguments(parser, epochs=20, batch_size=32, track="test")
    parser.add_argument("--exclude", default="", help="a run id: leave out its latest selection of --selection-split")
    parser.add_argument("--relabel", default="", help="a run id: use the suggested labels of its latest selection")
    parser.add_argument("--selection-split", default="train", choices=SPLITS, help="the split the selections apply to")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = distributed.local_device()  # under torchrun: this rank's GPU
    data_root = os.path.abspath(args.data_root) if args.data_root else None
    tracked_passes = parse_track(args.track, ["train", "test"])
    splits = {name: load_split(args.dataset, name, data_root) for name in {"train", *tracked_passes}}
    datasets = {name: split.dataset for name, split in splits.items()}
    taken, sample_ids = FromSelections(), {}
    if args.exclude or args.relabel:  # the source runs live where this run's tracker (MLflow for both) reads
        source = make_tracker(args.tracker if args.tracker != "both" else "mlflow")
        taken = from_selections(source, args.selection_split, args.exclude, args.relabel)
        chosen = args.selection_split
        datasets[chosen], sample_ids[chosen] = select_samples(
            splits[chosen].dataset, len(splits[chosen].class_names), taken.exclude, taken.new_labels)
    channels, height, _ = splits["train"].dataset[0][0].shape
    model = KerasCifarCNN(channels, len(splits["train"].class_names), height).to(device)
    train_and_record(
        tracker=partial(make_tracker, args.tracker), experiment=args.experiment or None, run_name=f"classify-{args.dataset}",
        params={
            "dataset": args.dataset, "data_root": args.data_root, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "track": args.track,
            "model": "keras_cifar10_cnn", "optimizer": "adam", "device": device.type,
            "exclude": args.exclude, "relabel": args.relabel,
            contract.TASK_PARAM: "classification", contract.DATASET_PARAM: args.dataset,
            contract.DATA_ROOT_PARAM: data_root or "",
        },
        model=model, step=classification_step, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        datasets=datasets, tracked_passes=tracked_passes,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=device,
        num_workers=args.num_workers, save_model=args.save_model, sample_ids=sample_ids, tags=taken.tags,
        media={split: partial(record_split_media, split=splits[split]) for split in tracked_passes},
    )


if __name__ == "__main__":
    try:
        main()
    except ActionScoresError as error:
        sys.exit(f"classify: error: {error}")
