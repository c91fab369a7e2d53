"""Datasets by name: fixed splits, ids that travel with the batch, imagefolder pixels, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from tracking.data import IndexedDataset, load_split
from tracking.errors import ActionScoresError


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train.labels), len(test.labels)) == (1437, 360)
    digits = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    test_rows, train_rows = np.sort(order[:360]), np.sort(order[360:])
    assert not set(test_rows) & set(train_rows)
    for sample_id in (0, 100, 359):
        assert test.labels[sample_id] == digits.target[test_rows[sample_id]]
        expected = np.round(digits.images[test_rows[sample_id]] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(test.image(sample_id), expected)
        tensor, label = test.dataset[sample_id]
        assert tensor.shape == (1, 8, 8) and label == test.labels[sample_id]
        torch.testing.assert_close(tensor[0], torch.from_numpy(expected).float() / 255)
    assert test.class_names == [str(d) for d in range(10)]


def test_indexed_batches_carry_ids_and_labels() -> None:
    test = load_split("digits", "test")
    loader = DataLoader(IndexedDataset(test.dataset), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    seen = []
    for batch in loader:
        assert batch["input"].shape[1:] == (1, 8, 8)
        np.testing.assert_array_equal(batch["target"].numpy(), test.labels[batch["sample_id"].numpy()])
        seen += batch["sample_id"].tolist()
    assert sorted(seen) == list(range(360)) and seen != sorted(seen)


def _folder(root: Path) -> dict[str, list[tuple[int, int, int]]]:
    colours = {"cat": [(255, 0, 0), (200, 0, 0)], "ant": [(0, 255, 0)], "dog": [(0, 0, 255), (0, 0, 100), (9, 9, 9)]}
    for split in ("train", "test"):
        for name, values in colours.items():
            (root / split / name).mkdir(parents=True)
            for index, colour in enumerate(values):
                Image.new("RGB", (6, 4), colour).save(root / split / name / f"{index}.png")
    return colours


def test_imagefolder_order_labels_and_pixels(tmp_path: Path) -> None:
    colours = _folder(tmp_path)
    split = load_split("imagefolder", "test", str(tmp_path))
    assert split.class_names == ["ant", "cat", "dog"]  # ImageFolder's sorted order
    expected = [(label, colour) for label, name in enumerate(["ant", "cat", "dog"]) for colour in colours[name]]
    assert split.labels.tolist() == [label for label, _ in expected]
    for sample_id, (label, colour) in enumerate(expected):
        picture = split.image(sample_id)
        assert picture.shape == (4, 6, 3) and tuple(picture[0, 0]) == colour
        tensor, item_label = split.dataset[sample_id]
        assert item_label == label and tensor.shape == (3, 4, 6)
        torch.testing.assert_close(tensor[:, 0, 0], torch.tensor(colour, dtype=torch.float32) / 255)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match=r"unknown dataset 'mnist'; choose one of \['cifar10', 'digits', 'imagefolder'\]"):
        load_split("mnist", "test")
    with pytest.raises(ActionScoresError, match="unknown split 'val'"):
        load_split("digits", "val")
    with pytest.raises(ActionScoresError, match="imagefolder needs --data-root"):
        load_split("imagefolder", "test", None)
    with pytest.raises(ActionScoresError, match=r"test not found; expected .*/test/<class>/<image>"):
        load_split("imagefolder", "test", str(tmp_path))


def test_cifar10_without_internet_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's download fails here (no network): the error must say what to do instead."""
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # fail fast and never leave the machine
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(ActionScoresError, match="could not download or find CIFAR-10") as error:
        load_split("cifar10", "test", str(tmp_path))
    assert "--dataset imagefolder" in str(error.value) and "cifar-10-batches-py" in str(error.value)
