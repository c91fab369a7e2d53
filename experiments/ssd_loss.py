"""SSD's multi-task loss, split per image into the paper's three parts.

torchvision's `SSD.compute_loss` normalises by the number of matched anchors of the
whole batch, so an image's loss depends on its batch mates. Here every image is
normalised by its own count N_i of matched (foreground) anchors:

- `loc`: smooth-L1 box regression over the image's matched anchors, / N_i;
- `pos`: cross-entropy of the matched anchors against their objects' classes, / N_i;
- `neg`: cross-entropy of the 3*N_i hardest background anchors (hard-negative mining at
  the model's `neg_to_pos_ratio`, 3:1 by default), / N_i.

The anchors, the matcher and the box coder are the model's own, so the parts hold for any
torchvision `SSD`: `ssd300_vgg16`, `ssdlite320_mobilenet_v3_large` (its head differs, its
outputs and loss do not) and the tiny one. An image with no
matched anchor (no boxes) is treated as N_i = 1: `loc` and `pos` are 0 and `neg` is its
`neg_to_pos_ratio` hardest background anchors, so false alarms on empty images still
count. The optimised objective is the mean over images of loc + pos + neg, which is
exactly what the recorder stores as `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

PARTS = ("loc", "pos", "neg")


@dataclass
class SSDForward:
    """One forward pass of an SSD, kept in pieces: the resized batch, its targets in the resized
    frame, the head's raw outputs and the anchors. Loss parts and detections are both read from it."""

    images: ImageList
    targets: list[dict[str, Tensor]]
    head: dict[str, Tensor]
    anchors: list[Tensor]


def ssd_forward(model: SSD, images: list[Tensor], targets: list[dict[str, Tensor]]) -> SSDForward:
    """The model's transform, backbone, head and anchors on a batch, as `SSD.forward` runs them.

    `images` are CxHxW tensors in [0, 1]; `targets` hold `boxes` (x1, y1, x2, y2 in pixels)
    and `labels` (1-based; 0 is background), as torchvision's detectors expect.
    """
    images_t, targets_t = model.transform(images, targets)
    features = model.backbone(images_t.tensors)
    if isinstance(features, Tensor):
        features = {"0": features}
    feature_list = list(features.values())
    return SSDForward(images_t, targets_t, model.head(feature_list), model.anchor_generator(images_t, feature_list))


def ssd_per_image_losses(model: SSD, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-image loss parts {"loc", "pos", "neg"}, each a (batch,) tensor (see `ssd_forward` for the inputs)."""
    return per_image_parts(model, ssd_forward(model, images, targets))


def ssd_detections(model: SSD, forward: SSDForward, original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """The boxes, scores and labels `SSD.forward` returns in eval mode, in each image's original pixels."""
    detections = model.postprocess_detections(forward.head, forward.anchors, forward.images.image_sizes)
    return model.transform.postprocess(detections, forward.images.image_sizes, original_sizes)


def per_image_parts(model: SSD, forward: SSDForward) -> dict[str, Tensor]:
    """Per-image loss parts {"loc", "pos", "neg"} of one forward pass, each a (batch,) tensor."""
    parts: dict[str, list[Tensor]] = {part: [] for part in PARTS}
    for target, regression, logits, image_anchors in zip(
        forward.targets, forward.head["bbox_regression"], forward.head["cls_logits"], forward.anchors
    ):
        if target["boxes"].numel() == 0:
            matched = torch.full((image_anchors.size(0),), -1, dtype=torch.int64, device=image_anchors.device)
        else:
            matched = model.proposal_matcher(box_ops.box_iou(target["boxes"], image_anchors))
        foreground = torch.where(matched >= 0)[0]
        matched_objects = matched[foreground]
        normaliser = max(1, foreground.numel())

        encoded = model.box_coder.encode_single(target["boxes"][matched_objects], image_anchors[foreground])
        parts["loc"].append(F.smooth_l1_loss(regression[foreground], encoded, reduction="sum") / normaliser)

        classes = torch.zeros(logits.size(0), dtype=torch.int64, device=logits.device)
        classes[foreground] = target["labels"][matched_objects]
        per_anchor = F.cross_entropy(logits, classes, reduction="none")
        parts["pos"].append(per_anchor[foreground].sum() / normaliser)

        background = per_anchor.masked_fill(classes > 0, -float("inf"))
        hardest = background.topk(min(int(model.neg_to_pos_ratio * normaliser), background.numel())).values
        parts["neg"].append(hardest[torch.isfinite(hardest)].sum() / normaliser)
    return {part: torch.stack(values) for part, values in parts.items()}
