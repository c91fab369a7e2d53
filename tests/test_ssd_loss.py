"""SSD loss parts per image: batch-independent, equal to torchvision's loss for one image, known loc on a hand-built case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.ssd import SSD

from experiments.models import detector, tiny_ssd
from tracking.errors import ActionScoresError
from experiments.detection_data import digit_scenes
from experiments.ssd_loss import per_image_parts, ssd_detections, ssd_forward, ssd_per_image_losses


def _batch(indices: list[int]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    scenes = digit_scenes("val")
    items = [scenes[i] for i in indices]
    return [image for image, _ in items], [target for _, target in items]


def test_parts_do_not_depend_on_batch_mates() -> None:
    torch.manual_seed(0)
    model = tiny_ssd(11).eval()
    with torch.no_grad():
        first = ssd_per_image_losses(model, *_batch([0, 1, 2, 3]))
        second = ssd_per_image_losses(model, *_batch([9, 2, 5]))
    for part in ("loc", "pos", "neg"):
        torch.testing.assert_close(first[part][2], second[part][1], rtol=1e-5, atol=1e-6)
        assert first[part][2] > 0


def test_train_mode_parts_are_batch_independent_too() -> None:
    """The tiny model has no BatchNorm, so even training-pass losses are per-image."""
    torch.manual_seed(0)
    model = tiny_ssd(11).train()
    first = ssd_per_image_losses(model, *_batch([4, 6]))
    second = ssd_per_image_losses(model, *_batch([6, 8, 4]))
    torch.testing.assert_close(first["loc"][0], second["loc"][2], rtol=1e-5, atol=1e-6)


def test_single_image_matches_torchvision_loss() -> None:
    """With one image per batch, per-image and per-batch normalisation agree: parts sum to torchvision's terms."""
    torch.manual_seed(0)
    model = tiny_ssd(11).train()
    images, targets = _batch([7])
    torch.manual_seed(1)
    reference = model(images, targets)
    torch.manual_seed(1)
    parts = ssd_per_image_losses(model, images, targets)
    torch.testing.assert_close(parts["loc"][0], reference["bbox_regression"])
    torch.testing.assert_close(parts["pos"][0] + parts["neg"][0], reference["classification"])


def test_sum_of_parts_is_the_optimised_total_and_has_gradients() -> None:
    torch.manual_seed(0)
    model = tiny_ssd(11).train()
    parts = ssd_per_image_losses(model, *_batch([0, 1, 2]))
    total = parts["loc"] + parts["pos"] + parts["neg"]
    total.mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("name", "size"), [("ssdlite", 96), ("ssd300", 300)])  # VGG's extras need ~300 px
def test_voc_models_parts_match_torchvision_loss_and_are_batch_independent(name: str, size: int) -> None:
    """SSDlite's head (depthwise convs, BatchNorm) and SSD300's VGG: the same per-image parts.

    Eval mode (the tracked pass; SSDlite's BatchNorm then uses running statistics): one image's
    parts equal torchvision's own `compute_loss` on the same forward pieces, and do not change
    with its batch mates.
    """
    torch.manual_seed(0)
    model = detector(name, 11, size=size).eval()
    with torch.no_grad():
        single = ssd_forward(model, *_batch([7]))
        parts = per_image_parts(model, single)
        reference = model.compute_loss(single.targets, single.head, single.anchors, _matched(model, single))
        torch.testing.assert_close(parts["loc"][0], reference["bbox_regression"])
        torch.testing.assert_close(parts["pos"][0] + parts["neg"][0], reference["classification"])
        batch = ssd_per_image_losses(model, *_batch([3, 7, 1]))
    for part in ("loc", "pos", "neg"):
        torch.testing.assert_close(batch[part][1], parts[part][0], rtol=1e-4, atol=1e-5)
        assert parts[part][0] > 0


def test_ssd300_below_its_smallest_input_is_refused_naming_the_size() -> None:
    """torch's own error ("Kernel size can't be greater than actual input size") names no input size."""
    with pytest.raises(ActionScoresError, match=r"ssd300 needs an input of at least 268 px, not 160"):
        detector("ssd300", 21, size=160)
    model = detector("ssd300", 21, size=268).eval()  # the smallest that runs
    with torch.no_grad():
        assert len(model([torch.rand(3, 268, 268)])) == 1


def _matched(model: SSD, forward) -> list[torch.Tensor]:  # noqa: ANN001 - an SSDForward
    """The matched object per anchor, as `SSD.forward` computes it before `compute_loss`."""
    from torchvision.ops import boxes as box_ops

    return [model.proposal_matcher(box_ops.box_iou(t["boxes"], a)) for t, a in zip(forward.targets, forward.anchors)]


def test_detections_of_the_loss_pass_equal_the_models_own() -> None:
    """The mAP's detections come from the loss pass's forward: they must be what `model(images)` returns."""
    torch.manual_seed(0)
    model = detector("ssdlite", 11, size=96).eval()
    images, targets = _batch([2, 5])
    with torch.no_grad():
        ours = ssd_detections(model, ssd_forward(model, images, targets), [tuple(i.shape[-2:]) for i in images])
        theirs = model(images)
    for mine, reference in zip(ours, theirs):
        assert mine.keys() == reference.keys() and len(mine["boxes"]) > 0
        for key in mine:
            torch.testing.assert_close(mine[key], reference[key])


class _OneAnchorGenerator(torch.nn.Module):
    """Two fixed anchors (pixels of the 64x64 input): one over the object, one far away."""

    aspect_ratios = [[]]  # one feature map, as SSD's constructor checks

    def num_anchors_per_location(self) -> list[int]:
        return [2]

    def forward(self, images, features):  # noqa: ANN001 - torchvision's call signature
        anchors = torch.tensor([[8.0, 8.0, 40.0, 40.0], [44.0, 44.0, 60.0, 60.0]])
        return [anchors for _ in range(images.tensors.shape[0])]


class _ConstantBackbone(torch.nn.Module):
    out_channels = [4]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"0": torch.zeros(x.shape[0], 4, 1, 1)}


def test_hand_built_case_gives_expected_loc() -> None:
    """One box, known anchors, zero regression output: loc = smooth-L1 of the encoded box offsets."""
    model = SSD(_ConstantBackbone(), _OneAnchorGenerator(), (64, 64), num_classes=3, image_mean=[0.0] * 3, image_std=[1.0] * 3)
    for head in (model.head.classification_head, model.head.regression_head):
        for conv in head.module_list:
            torch.nn.init.zeros_(conv.weight)
            torch.nn.init.zeros_(conv.bias)
    box = torch.tensor([[10.0, 12.0, 42.0, 36.0]])
    parts = ssd_per_image_losses(model.eval(), [torch.zeros(3, 64, 64)], [{"boxes": box, "labels": torch.tensor([2])}])

    # Independent encoding (SSD's box coder, weights 10, 10, 5, 5) of the box against anchor 0.
    ax, ay, aw, ah = 24.0, 24.0, 32.0, 32.0
    bx, by, bw, bh = 26.0, 24.0, 32.0, 24.0
    offsets = torch.tensor([10 * (bx - ax) / aw, 10 * (by - ay) / ah, 5 * np.log(bw / aw), 5 * np.log(bh / ah)])
    expected_loc = F.smooth_l1_loss(torch.zeros(4), offsets.float(), reduction="sum")  # one matched anchor
    torch.testing.assert_close(parts["loc"][0], expected_loc)
    # Zero logits: cross-entropy is log(3) for the matched anchor and for the one mined negative (3:1, one available).
    torch.testing.assert_close(parts["pos"][0], torch.tensor(np.log(3.0), dtype=torch.float32))
    torch.testing.assert_close(parts["neg"][0], torch.tensor(np.log(3.0), dtype=torch.float32))


def test_image_without_boxes_counts_only_mined_negatives() -> None:
    torch.manual_seed(0)
    model = tiny_ssd(11).eval()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with torch.no_grad():
        parts = ssd_per_image_losses(model, [torch.rand(3, 128, 128)], [empty])
    assert parts["loc"][0] == 0 and parts["pos"][0] == 0 and parts["neg"][0] > 0
