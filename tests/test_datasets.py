"""Datasets by name: fixed splits, ids that travel with the batch, imagefolder pixels, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

from experiments import datasets as data
from experiments.datasets import load_split
from tracking.record import IndexedDataset
from tracking.errors import ActionScoresError


def test_digits_split_is_fixed_and_disjoint() -> None:
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train.labels), len(test.labels)) == (1437, 360)
    assert (len(train.dataset), len(test.dataset)) == (1437, 360)
    assert train.labels.dtype == np.int64 and test.class_names == [str(d) for d in range(10)]
    digits = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    rows = {"test": np.sort(order[:360]), "train": np.sort(order[360:])}
    assert not set(rows["test"]) & set(rows["train"])
    for name, split in (("test", test), ("train", train)):
        for sample_id in (0, 100, 359):
            row = rows[name][sample_id]
            assert split.labels[sample_id] == digits.target[row]
            picture = split.image(sample_id)
            assert picture.shape == (8, 8) and picture.dtype == np.uint8
            np.testing.assert_array_equal(picture, np.round(digits.images[row] * 255 / 16).astype(np.uint8))
            tensor, label = split.dataset[sample_id]
            assert tensor.shape == (1, 8, 8) and tensor.dtype == torch.float32 and label == digits.target[row]
            torch.testing.assert_close(tensor[0], torch.from_numpy(digits.images[row] / 16).float())
    # Pinned: if numpy's generator or the seed ever changed, every stored sample_id would point elsewhere.
    assert rows["test"][:8].tolist() == [2, 12, 13, 20, 28, 38, 44, 53]
    assert test.labels[:8].tolist() == [2, 2, 3, 0, 8, 8, 7, 8]
    assert train.labels[:3].tolist() == digits.target[[0, 1, 3]].tolist()


def test_indexed_batches_carry_ids_and_labels() -> None:
    test = load_split("digits", "test")
    loader = DataLoader(IndexedDataset(test.dataset), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    seen = []
    for batch in loader:
        assert set(batch) == {"sample_id", "input", "target"}
        assert batch["input"].shape[1:] == (1, 8, 8) and batch["sample_id"].dtype == torch.int64
        np.testing.assert_array_equal(batch["target"].numpy(), test.labels[batch["sample_id"].numpy()])
        for sample_id, tensor in zip(batch["sample_id"].tolist()[:3], batch["input"][:3]):
            torch.testing.assert_close(tensor, test.dataset[sample_id][0])
        seen += batch["sample_id"].tolist()
    assert sorted(seen) == list(range(360)) and seen != sorted(seen)


COLOURS = {"cat": [(255, 0, 0), (200, 0, 0)], "ant": [(0, 255, 0)], "dog": [(0, 0, 255), (0, 0, 100), (9, 9, 9)]}


def _written(colour: tuple[int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The HxWx3 pixels of a test image: one colour, with a marker on its bottom row, second column, so
    that a flipped or transposed read shows."""
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[-1, 1] = (17, 34, 51)
    return pixels


def _folder(root: Path, size: tuple[int, int] = (6, 4)) -> None:
    """A tiny imagefolder: train/ and test/, three classes of PNGs (width x height `size`)."""
    for split in ("train", "test"):
        for name, values in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for index, colour in enumerate(values):
                Image.fromarray(_written(colour, size)).save(root / split / name / f"{index}.png")


def _expected() -> list[tuple[int, tuple[int, int, int]]]:
    """(label, colour) by sample_id: classes sorted by name, files sorted within each."""
    return [(label, colour) for label, name in enumerate(sorted(COLOURS)) for colour in COLOURS[name]]


def _check_pixels(split: data.SplitData, shape: tuple[int, int, int]) -> None:
    assert split.class_names == ["ant", "cat", "dog"]  # ImageFolder's sorted order
    assert split.labels.tolist() == [label for label, _ in _expected()]
    for sample_id, (label, colour) in enumerate(_expected()):
        picture = split.image(sample_id)
        assert picture.dtype == np.uint8
        np.testing.assert_array_equal(picture, _written(colour, (shape[1], shape[0])))
        tensor, item_label = split.dataset[sample_id]
        assert item_label == label and tensor.shape == (3, *shape[:2]) and tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, torch.from_numpy(picture).permute(2, 0, 1).float() / 255)


def test_imagefolder_order_labels_and_pixels(tmp_path: Path) -> None:
    _folder(tmp_path)
    split = load_split("imagefolder", "test", str(tmp_path))
    assert isinstance(split.dataset, data._ArrayDataset)  # decoded once into memory, as one array
    assert isinstance(split.dataset.pictures, np.ndarray) and split.dataset.pictures.shape == (6, 4, 6, 3)
    _check_pixels(split, (4, 6, 3))


def test_imagefolder_large_splits_decode_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _folder(tmp_path)
    monkeypatch.setattr(data, "IN_MEMORY_LIMIT", 5)  # the split has 6 images
    split = load_split("imagefolder", "train", str(tmp_path))
    assert isinstance(split.dataset, data._LazyImages)
    _check_pixels(split, (4, 6, 3))


def test_imagefolder_of_mixed_sizes(tmp_path: Path) -> None:
    _folder(tmp_path)
    Image.new("RGB", (3, 5), (1, 2, 3)).save(tmp_path / "test" / "dog" / "9.png")  # sorts last
    split = load_split("imagefolder", "test", str(tmp_path))
    assert split.image(6).shape == (5, 3, 3) and tuple(split.image(6)[0, 0]) == (1, 2, 3)
    assert split.dataset[6][0].shape == (3, 5, 3) and split.dataset[0][0].shape == (3, 4, 6)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ActionScoresError, match=r"unknown dataset 'mnist'; choose one of \['cifar10', 'digits', 'imagefolder'\]"):
        load_split("mnist", "test")
    with pytest.raises(ActionScoresError, match=r"unknown split 'val' of 'digits'; choose one of \['train', 'test'\]"):
        load_split("digits", "val")
    with pytest.raises(ActionScoresError, match="imagefolder needs --data-root"):
        load_split("imagefolder", "test", None)
    with pytest.raises(ActionScoresError, match=r"data root .*nowhere not found; pass --data-root"):
        load_split("imagefolder", "test", str(tmp_path / "nowhere"))
    with pytest.raises(ActionScoresError, match=r"test not found; expected .*/test/<class>/<image>"):
        load_split("imagefolder", "test", str(tmp_path))
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(ActionScoresError, match=r"no images under .*test"):
        load_split("imagefolder", "test", str(tmp_path))
    with pytest.raises(ActionScoresError, match="cifar10 needs a data folder: pass --data-root"):
        load_split("cifar10", "test")


def test_cifar10_without_internet_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download fails (here there is no network; elsewhere the proxy below refuses at once, so the
    test neither hangs nor downloads 170 MB): the error must say what to do instead."""
    for variable in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # the discard port: connection refused
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ActionScoresError, match=r"download failed \(no internet\?\)") as error:
        load_split("cifar10", "test", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "--dataset imagefolder --data-root" in message


def test_every_built_in_dataset_registers_the_view_the_job_finds() -> None:
    import importlib.metadata
    import tomllib

    from experiments.detection_data import DETECTION_DATASETS

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())[
        "project"]["entry-points"]["action_scores.views"]
    assert sorted(declared) == sorted([*data.DATASETS, *DETECTION_DATASETS])
    for name, value in declared.items():
        view = importlib.metadata.EntryPoint(name, value, "action_scores.views").load()
        assert view is (data.split_view if name in data.DATASETS else __import__(
            "experiments.detection_data", fromlist=["split_view"]).split_view)
    shown = data.split_view("digits", "test", np.array([3, 0]), None)
    digits = load_split("digits", "test")
    assert shown.columns["label_name"].tolist() == [str(digits.labels[3]), str(digits.labels[0])]
    np.testing.assert_array_equal(shown.picture(3), digits.image(3))
