"""Models of the paper's two settings, in PyTorch."""

from __future__ import annotations

import pickle
from functools import partial

import torch
from torch import nn

from tracking.errors import ActionScoresError


class KerasCifarCNN(nn.Module):
    """The Keras CIFAR-10 example CNN (the paper's "VGG-like" classifier), ported to PyTorch.

    conv32-conv32-pool-dropout, conv64-conv64-pool-dropout, dense512-dropout, dense.
    As in Keras, the first conv of a block pads ("same") and the second does not; on
    inputs smaller than 16 px (scikit-learn's 8x8 digits) both pad, or nothing would
    be left after the second pool. Returns logits: softmax lives in the loss.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        second = "valid" if image_size >= 16 else "same"
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding="same"), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=second), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(32, 64, 3, padding="same"), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=second), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(flat, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class _TinyBackbone(nn.Module):
    """Four feature maps at strides 8, 16, 32, 64; no BatchNorm, so an image's output never
    depends on its batch mates (per-image losses stay batch-independent in train mode too)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True),
            )

        self.stem = nn.Sequential(block(3, width, 2), block(width, width * 2, 2), block(width * 2, width * 4, 2))
        self.stages = nn.ModuleList([block(width * 4, width * 4, 2), block(width * 4, width * 4, 2),
                                     block(width * 4, width * 4, 2)])
        self.out_channels = [width * 4] * 4

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {"0": self.stem(images)}
        for index, stage in enumerate(self.stages, start=1):
            features[str(index)] = stage(features[str(index - 1)])
        return features


def tiny_ssd(num_classes: int, size: int = 128) -> nn.Module:
    """A small SSD-style detector for CPU-sized runs: torchvision's SSD with a 4-map backbone."""
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD

    anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2]], min_ratio=0.1, max_ratio=0.9)
    return SSD(_TinyBackbone(), anchors, (size, size), num_classes,
               image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])


def set_input_size(model: nn.Module, size: int) -> nn.Module:
    """Make a torchvision SSD resize its inputs to `size` x `size` instead of its built-in size.

    The anchors are fractions of the image (`DefaultBoxGenerator`) and the feature maps follow
    the input, so a smaller input trades small-object recall for speed with nothing else changed.
    """
    model.transform.min_size = (size,)
    model.transform.max_size = size
    model.transform.fixed_size = (size, size)
    return model


def ssdlite(num_classes: int, size: int = 320) -> nn.Module:
    """torchvision's `ssdlite320_mobilenet_v3_large` from scratch (its own init, reduced tail),
    at `size` x `size` input: the VOC default, since it learns on 2 CPU cores where SSD300 cannot.

    It has BatchNorm, so training-pass losses depend on batch mates; the eval pass that scores
    the tracked split uses running statistics, so the recorded parts stay per image.
    """
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    return set_input_size(model, size)


def ssd300(num_classes: int, weights: str | None = None, size: int = 300) -> nn.Module:
    """torchvision's `ssd300_vgg16` (the paper's SSD300), from scratch or from a local state dict
    (`load_weights`), at `size` x `size` input."""
    from torchvision.models.detection import ssd300_vgg16

    model = set_input_size(ssd300_vgg16(weights=None, weights_backbone=None, num_classes=num_classes), size)
    return load_weights(model, weights) if weights else model


def load_weights(model: nn.Module, weights: str) -> nn.Module:
    """Load a local state dict into `model` (nothing is downloaded), with weights_only=True."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # objects other than tensors and plain containers
        raise ActionScoresError(
            f"{weights} is not a plain state dict: it holds objects that only unpickling arbitrary code "
            f"could rebuild, which is never done ({str(error).splitlines()[0]})"
        ) from None
    model.load_state_dict(state)
    return model


DETECTORS = {"tiny": (tiny_ssd, 128), "ssdlite": (ssdlite, 320), "ssd300": (partial(ssd300, weights=None), 300)}
# Below 268 px the VGG's last extra layers of SSD300 get feature maps smaller than their 3x3 kernels
# (measured: 267 fails, 268 runs), and torch's error says nothing of the input size.
SMALLEST_INPUT = {"ssd300": 268}


def detector(name: str, num_classes: int, size: int = 0, weights: str = "") -> nn.Module:
    """A detector of `DETECTORS` by name, at `size` px input (0: its own), optionally with local weights."""
    if name not in DETECTORS:
        raise ActionScoresError(f"unknown detection model {name!r}; choose one of {sorted(DETECTORS)}")
    build, own_size = DETECTORS[name]
    if size and size < SMALLEST_INPUT.get(name, 0):
        raise ActionScoresError(f"{name} needs an input of at least {SMALLEST_INPUT[name]} px, not {size}: its last "
                                f"feature maps would be smaller than their kernels; use --image-size 0 (its own "
                                f"{own_size}) or a smaller model (ssdlite, tiny)")
    model = build(num_classes, size=size or own_size)
    return load_weights(model, weights) if weights else model
