"""Train an SSD detector and record every image's loss parts (loc, pos, neg) each epoch.

    mlflow run . -e detect --env-manager local                          # tiny SSD on digit-scenes, no download
    python -m experiments.detect --dataset voc2007 --data-root /tmp/data/voc             # SSDlite, from scratch
    python -m experiments.detect --dataset voc2007 --data-root /tmp/data/voc --model ssd300 --epochs 10

Writes to the run: per_sample_losses/<split>/epoch_EEEE.parquet every epoch with
`loss` (= loss_loc + loss_pos + loss_neg, the objective the optimiser minimises, per
image) and `num_objects`, each tracked split's thumbnails with their boxes and class names once
(per_sample_media/<split>/media.parquet), and the metric `val_map_50` (mAP at IoU 0.5 of the tracked val
eval pass's detections, COCO-style via torchmetrics and pycocotools); then
`action-scores analyze --run-id <id>` gives an action per part and box-drawn panels.
Parts are normalised per image (see experiments/ssd_loss.py).
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
from experiments.models import DETECTORS, detector
from tracking import contract
from tracking.record import distributed
from experiments.detection_data import (DETECTION_DATASETS, detection_collate, load_detection_split,
                                        record_detection_media)
from tracking.errors import ActionScoresError
from experiments.ssd_loss import per_image_parts, ssd_detections, ssd_forward
from tracking.backends import make_tracker

SPLITS = ["train", "val"]
DEFAULT_MODEL = {"digit-scenes": "tiny", "voc2007": "ssdlite"}  # what learns here, on 2 CPU cores


class DetectionStep:
    """SSD's loss split per image into loc / pos / neg, plus each image's number of objects.

    In eval mode (the tracked split's pass) the same forward pass also gives the detections;
    `epoch_metrics` turns them into mAP@0.5 (torchmetrics' `MeanAveragePrecision`, pycocotools
    backend). Under torchrun the ranks' detections are gathered to rank 0 first: torchmetrics' own
    sync needs as many images on every rank, and the eval shares are unpadded, so they may differ by one.
    """

    def __init__(self, metric_name: str | None) -> None:
        self.metric_name = metric_name  # None: no mAP (several eval-pass splits would mix)
        self.detections: list[dict[str, torch.Tensor]] = []
        self.truths: list[dict[str, torch.Tensor]] = []

    def __call__(self, model: nn.Module, batch: dict) -> StepOutput:
        forward = ssd_forward(model, batch["input"], batch["target"])
        parts = per_image_parts(model, forward)
        if not model.training and self.metric_name is not None:
            sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in batch["input"]]
            self.detections += [{k: v.detach().cpu() for k, v in d.items()}
                                for d in ssd_detections(model, forward, sizes)]
            self.truths += [{k: v.cpu() for k, v in t.items()} for t in batch["target"]]
        objects = torch.tensor([len(t["labels"]) for t in batch["target"]], dtype=torch.int32)
        return StepOutput(parts, {"num_objects": objects})

    def epoch_metrics(self) -> dict[str, float]:
        """`<split>_map_50` of this epoch's eval pass, on rank 0 (every rank must call it: it gathers, then
        agrees, so that a failure of the metric on rank 0 stops every rank instead of leaving them in DDP)."""
        if self.metric_name is None:
            return {}
        shares = distributed.gather_shares((self.detections, self.truths)) or []  # [] on ranks other than 0
        self.detections, self.truths = [], []
        metrics: dict[str, float] = {}
        error = None
        try:
            metrics = self._map_50(shares)
        except Exception as map_error:
            error = map_error
        distributed.agree(error, f"{self.metric_name}_map_50")
        return metrics

    def _map_50(self, shares: list[tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]],
                ) -> dict[str, float]:
        """mAP@0.5 of the gathered detections: {} where there are none (ranks other than 0)."""
        detections = [d for share in shares for d in share[0]]
        if not detections:  # not rank 0, or no eval pass this epoch
            return {}
        from torchmetrics.detection import MeanAveragePrecision

        quality = MeanAveragePrecision(iou_thresholds=[0.5], backend="pycocotools", sync_on_compute=False)
        quality.update(detections, [t for share in shares for t in share[1]])
        return {f"{self.metric_name}_map_50": float(quality.compute()["map_50"])}


def check_batches_train(model: nn.Module, train_size: int, batch_size: int) -> None:
    """Refuse a last training batch of one image for a model with BatchNorm (SSDlite): its 1x1
    feature maps would hold one value per channel, which BatchNorm cannot normalise in training."""
    if not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        return
    share = -(-train_size // int(os.environ.get("WORLD_SIZE", "1")))  # DistributedSampler's per-rank share
    if share % batch_size == 1:
        raise ActionScoresError(
            f"the last training batch would hold a single image ({share} training images, batch size {batch_size}), "
            "which the model's BatchNorm cannot train on; change --batch-size or --limit by one"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digit-scenes", choices=sorted(DETECTION_DATASETS))
    parser.add_argument("--model", default="", choices=["", *sorted(DETECTORS)],
                        help="tiny (digit-scenes' default), ssdlite (voc2007's default: ssdlite320_mobilenet_v3_large "
                             "from scratch) or ssd300 (the paper's ssd300_vgg16)")
    parser.add_argument("--image-size", type=int, default=0,
                        help="input side in pixels the model resizes to (0 = its own: 128, 320, 300)")
    parser.add_argument("--weights", default="", help="local state dict for the model (nothing is downloaded)")
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
    model_name = args.model or DEFAULT_MODEL[args.dataset]
    model = detector(model_name, num_classes, args.image_size, args.weights).to(device)
    eval_splits = [split for split, scored_by in tracked_passes.items() if scored_by == "eval"]
    datasets = {name: Subset(split.dataset, range(min(args.limit, len(split.dataset)))) if args.limit
                else split.dataset for name, split in splits.items()}
    check_batches_train(model, len(datasets["train"]), args.batch_size)
    step = DetectionStep(eval_splits[0] if len(eval_splits) == 1 else None)
    train_and_record(
        tracker=partial(make_tracker, args.tracker), experiment=args.experiment or None,
        run_name=f"detect-{args.dataset}-{model_name}",
        params={
            "dataset": args.dataset, "data_root": args.data_root, "model": args.model, "image_size": args.image_size,
            # what "" and 0 resolved to (`mlflow run` logs the entry point's own values under the names above)
            "detector": model_name, "input_size": model.transform.fixed_size[0], "weights": args.weights,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "track": args.track, "limit": args.limit, "optimizer": "adam", "device": device.type,
            contract.TASK_PARAM: "detection", contract.DATASET_PARAM: args.dataset,
            contract.DATA_ROOT_PARAM: data_root or "",
        },
        model=model, step=step, optimizer=torch.optim.Adam(model.parameters(), lr=args.lr),
        datasets=datasets,
        tracked_passes=tracked_passes,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=device,
        collate_fn=detection_collate, num_workers=args.num_workers, save_model=args.save_model,
        epoch_metrics=step.epoch_metrics,
        media={split: partial(record_detection_media, split=splits[split]) for split in tracked_passes},
    )


if __name__ == "__main__":
    try:
        main()
    except ActionScoresError as error:
        sys.exit(f"detect: error: {error}")
