"""record_media and the recorder's one-call classification update: what lands in the run, and what is refused."""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tracking.backends import MLflowTracker
from tracking.errors import ActionScoresError
from tracking.record import LossRecorder, record_media
from tracking.record.media import MAX_TEXT_CHARS, THUMBNAIL_SIDE, encode_png
from tracking.record.png import stored_pngs


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as picture:
        return np.asarray(picture)


def _rows(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def test_images_land_in_the_mlflow_run_sorted_with_exact_pixels_and_label_names(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=f"media-{uuid.uuid4().hex[:8]}")
    try:
        summary = record_media(tracker, "test", torch.tensor([2, 0, 1]), labels=["two", "zero", "one"], images=grey,
                               local_dir=tmp_path / "local")
    finally:
        tracker.finish()
    assert (summary.kind, summary.rows, summary.reason) == ("image", 3, "")
    assert summary.bytes == summary.path.stat().st_size
    assert summary.bytes_per_sample == pytest.approx(summary.bytes / 3)
    client = mlflow.MlflowClient(mlflow_server)
    assert [a.path for a in client.list_artifacts(run_id, "per_sample_media/test")] == [
        "per_sample_media/test/media.parquet"]
    rows = _rows(Path(client.download_artifacts(run_id, "per_sample_media/test/media.parquet", str(tmp_path / "d"))))
    assert rows["sample_id"] == [0, 1, 2]
    assert rows["label_name"] == ["zero", "one", "two"]
    assert rows["kind"] == ["image"] * 3 and rows["text"] == [None] * 3 and rows["uri"] == [None] * 3
    for position, sample_id in enumerate([0, 1, 2]):  # sample 0 was given second, sample 2 first
        np.testing.assert_array_equal(_pixels(rows["image_png"][position]), grey[[1, 2, 0][sample_id]])


def test_large_pictures_become_thumbnails_and_small_rgb_ones_stay_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (224, 160, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    one_channel = rng.integers(0, 256, (5, 7, 1), dtype=np.uint8)
    summary = record_media(None, "train", [0, 1, 2], images=[photo, small, one_channel], local_dir=tmp_path)
    rows = _rows(summary.path)
    assert _pixels(rows["image_png"][0]).shape == (THUMBNAIL_SIDE, round(160 * THUMBNAIL_SIDE / 224), 3)
    np.testing.assert_array_equal(_pixels(rows["image_png"][1]), small)
    np.testing.assert_array_equal(_pixels(rows["image_png"][2]), one_channel[:, :, 0])
    assert rows["label_name"] == [None] * 3


def test_texts_are_truncated_and_uris_given_beside_them_are_kept(tmp_path: Path) -> None:
    long = "word " * 400
    summary = record_media(None, "test", np.array([1, 0]), texts=["short one", long], uris=["s3://b/1", "s3://b/0"],
                           labels=["pos", "neg"], local_dir=tmp_path)
    rows = _rows(summary.path)
    assert rows["kind"] == ["text", "text"]
    assert rows["text"] == [long[:MAX_TEXT_CHARS], "short one"]
    assert rows["uri"] == ["s3://b/0", "s3://b/1"]
    assert rows["image_png"] == [None, None]


def test_above_the_cap_uris_are_recorded_instead_with_a_warning(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    uris = [f"/data/{i}.png" for i in range(4)]
    with pytest.warns(UserWarning, match="above max_bytes=1,000; recorded the URIs instead"):
        summary = record_media(None, "test", range(4), images=list(images), uris=uris, max_bytes=1000,
                               local_dir=tmp_path)
    assert summary.kind == "uri" and "recorded the URIs instead" in summary.reason
    rows = _rows(summary.path)
    assert rows["kind"] == ["uri"] * 4 and rows["uri"] == uris and rows["image_png"] == [None] * 4


def test_above_the_cap_without_uris_nothing_is_written(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="recorded nothing: pass uris="):
        summary = record_media(None, "test", [0, 1], texts=["a" * 600, "b" * 600], max_bytes=1000, local_dir=tmp_path)
    assert (summary.kind, summary.rows, summary.bytes, summary.path) == ("none", 0, 0, None)
    assert not any(tmp_path.iterdir())


GREY = np.zeros((2, 4, 4), dtype=np.uint8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=GREY.astype(np.float32)), r"dtype float32, expected uint8; convert with \(x \* 255\)"),
    (dict(images=np.zeros((2, 3, 8, 8), dtype=np.uint8)), "channels first; pass channels last"),
    (dict(images=np.zeros((2, 4, 4, 4), dtype=np.uint8)), r"expected HxW \(grey\) or HxWx3"),
    (dict(images=[np.zeros((0, 4), dtype=np.uint8)] * 2), "both sides > 0"),
    (dict(images=GREY[:1]), "1 images for 2 sample ids; pass one per sample id"),
    (dict(images="a.png"), "images must be an NxHxW"),
    (dict(texts=["only one"]), "1 texts for 2 sample ids"),
    (dict(texts=["a", 3]), r"texts must be strings; positions \[1\] hold int"),
    (dict(uris=["a"] * 3), "3 uris for 2 sample ids"),
    (dict(images=GREY, texts=["a", "b"]), "both images and texts; a split's media is one kind"),
    (dict(), "no media; pass images=, texts= or uris="),
    (dict(texts=["a", "b"], labels=["x"]), "1 labels for 2 sample ids"),
    (dict(texts=["a", "b"], labels=[0, 1]), r"labels must be strings.*\[class_names\[y\] for y in targets\]"),
    (dict(texts=["a", "b"], max_bytes=0), "max_bytes must be positive"),
])
def test_bad_media_is_refused_naming_the_fix_and_nothing_is_written(tmp_path: Path, kwargs: dict,
                                                                   message: str) -> None:
    with pytest.raises(ActionScoresError, match=message):
        record_media(None, "test", [0, 1], local_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("ids, message", [
    ([0, 0], r"^record_media: sample ids \[0\] appear more than once; pass each sample once$"),
    ([0, -1], r"^record_media: sample ids must be >= 0, got \[-1\]$"),
    ([0.0, 1.0], "^record_media: sample_ids must be integers, got dtype float64$"),
    ([], "^record_media: sample_ids is empty; pass the ids of the samples$"),
])
def test_bad_ids_are_refused(tmp_path: Path, ids: list, message: str) -> None:
    with pytest.raises(ActionScoresError, match=message):
        record_media(None, "test", np.array(ids), texts=["a"] * len(ids), local_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_recorder_records_media_into_its_folder_and_refuses_ids_outside_its_split(tmp_path: Path) -> None:
    recorder = LossRecorder("val", num_samples=3, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=r"^split 'val': media: sample ids out of range \[0, 3\): \[3\]$"):
        recorder.record_media([0, 3], texts=["a", "b"])
    assert not any(tmp_path.iterdir())
    summary = recorder.record_media(torch.arange(3), texts=["a", "b", "c"], labels=["x", "y", "x"])
    assert summary.path == tmp_path / "per_sample_media" / "val" / "media.parquet"
    assert _rows(summary.path)["label_name"] == ["x", "y", "x"]


def test_recorder_media_reach_the_run_only_once_the_splits_first_table_has_passed_its_checks(
        mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    client = mlflow.MlflowClient(mlflow_server)
    experiment = f"media-after-table-{uuid.uuid4().hex[:8]}"
    tracker = MLflowTracker(mlflow_server)
    failed_run = tracker.start(experiment=experiment)
    try:  # an own loop that fails at its first epoch
        recorder = LossRecorder("val", num_samples=3, tracker=tracker)
        summary = recorder.record_media(np.arange(3), texts=["a", "b", "c"])
        assert summary.path.is_file()  # checked, encoded and written locally at once
        recorder.update(torch.tensor([0, 1]), torch.ones(2))
        with pytest.raises(ActionScoresError, match=r"^split 'val', epoch 0: 1 of 3 samples missing: \[2\]$"):
            recorder.end_epoch(0)
    finally:
        tracker.finish(failed=True)
    assert client.list_artifacts(failed_run) == []  # no media in a run without tables

    tracker = MLflowTracker(mlflow_server)
    run_id = tracker.start(experiment=experiment)
    try:
        val, train = LossRecorder("val", 3, tracker=tracker), LossRecorder("train", 2, tracker=tracker)
        val.record_media(np.arange(3), texts=["a", "b", "c"])
        val.update(torch.arange(3), torch.ones(3))
        val.end_epoch(0)  # its table passed: the media follow it
        train.update(torch.arange(2), torch.ones(2))
        train.end_epoch(0)
        train.record_media(np.arange(2), texts=["x", "y"])  # after the first table: handed over at once
    finally:
        tracker.finish()
    for split, texts in (("val", ["a", "b", "c"]), ("train", ["x", "y"])):
        assert [a.path for a in client.list_artifacts(run_id, f"per_sample_media/{split}")] == [
            f"per_sample_media/{split}/media.parquet"]
        local = client.download_artifacts(run_id, f"per_sample_media/{split}/media.parquet", str(tmp_path / split))
        assert _rows(Path(local))["text"] == texts


def test_update_classification_equals_cross_entropy_and_softmax_by_hand(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    targets = np.array([0, 2, 1, 1, 0])
    recorder = LossRecorder("test", num_samples=5, local_dir=tmp_path)
    order = np.array([4, 1, 3, 0, 2])
    for batch in (order[:2], order[2:]):
        recorder.update_classification(torch.as_tensor(batch), torch.as_tensor(logits[batch]),
                                       torch.as_tensor(targets[batch]))
    rows = _rows(recorder.end_epoch(0))
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    p_true = probabilities[np.arange(5), targets]
    others = np.where(np.eye(3, dtype=bool)[targets], -np.inf, logits).max(axis=1)
    assert rows["sample_id"] == [0, 1, 2, 3, 4]
    assert rows["target"] == targets.tolist()
    np.testing.assert_allclose(rows["loss"], -np.log(p_true), rtol=1e-5)
    np.testing.assert_allclose(rows["p_true"], p_true, rtol=1e-5)
    np.testing.assert_allclose(rows["margin"], logits[np.arange(5), targets] - others, rtol=1e-5)
    np.testing.assert_allclose(rows["el2n"], np.linalg.norm(probabilities - np.eye(3)[targets], axis=1), rtol=1e-5)
    assert rows["correct"] == (logits.argmax(axis=1) == targets).tolist()


@pytest.mark.parametrize("logits, targets, message", [
    (torch.zeros(4), torch.zeros(4, dtype=torch.long), r"expected \(N, C\) floats"),
    (torch.zeros(4, 3), torch.zeros(4, 3), r"expected \(4,\) class indices.*not one-hot"),
    (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), r"expected \(4,\) class indices"),
    (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), r"class indices in \[0, 3\), got values from 0 to 3"),
])
def test_update_classification_refuses_bad_logits_and_targets(tmp_path: Path, logits: torch.Tensor,
                                                              targets: torch.Tensor, message: str) -> None:
    recorder = LossRecorder("test", num_samples=4, local_dir=tmp_path)
    with pytest.raises(ActionScoresError, match=message):
        recorder.update_classification(torch.arange(4), logits, targets)
    with pytest.raises(ActionScoresError, match="^split 'test': no batch was recorded this epoch"):
        recorder.end_epoch(0)


def test_pictures_above_the_stored_size_are_pils_pngs_not_a_wrong_filter_choice(tmp_path: Path) -> None:
    """Rows whose neighbours differ by 128 made the hand-written row filter (np.abs of int8 -128 is -128) pick
    the sub filter for every row: 865 bytes per picture against PIL's 421. Pictures above
    `STORED_PICTURE_BYTES` now go through PIL, byte for byte."""
    rng = np.random.default_rng(0)
    columns = rng.integers(0, 120, 20) + np.cumsum(rng.integers(0, 2, (48, 20)), axis=0)  # rows drift slowly
    picture = (np.stack([columns, columns + 128], axis=2).reshape(48, 40) % 256).astype(np.uint8)
    pixels = np.stack([picture, picture[::-1]])
    summary = record_media(None, "test", [0, 1], images=pixels, local_dir=tmp_path)
    pngs = _rows(summary.path)["image_png"]
    assert pngs == [encode_png(pixels[0]), encode_png(pixels[1])]
    assert [len(png) for png in pngs] == [len(encode_png(picture)), len(encode_png(picture[::-1]))]
    assert len(pngs[0]) < 500  # the hand-written filters: 865
    for png, expected in zip(pngs, pixels, strict=True):
        np.testing.assert_array_equal(_pixels(png), expected)


@pytest.mark.parametrize("shape", [(40, 8, 8), (12, 32, 32), (6, 9, 7, 3), (3, 1, 1)])
def test_stored_pngs_are_valid_pngs_of_the_same_pixels(shape: tuple[int, ...]) -> None:
    """Level 0 frames the zlib stream with numpy: chunk CRCs and the Adler-32 must be right, not just the pixels
    (PIL stops reading before the checksum), so the stream is checked by zlib itself."""
    pixels = np.random.default_rng(3).integers(0, 256, size=shape, dtype=np.uint8)
    pngs = stored_pngs(pixels)
    for png, picture in zip(pngs, pixels, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), picture)
        position, chunks = 8, {}
        while position < len(png):
            (size,) = struct.unpack(">I", png[position:position + 4])
            kind, data = png[position + 4:position + 8], png[position + 8:position + 8 + size]
            assert struct.unpack(">I", png[position + 8 + size:position + 12 + size])[0] == zlib.crc32(kind + data)
            chunks[kind] = data
            position += 12 + size
        rows = zlib.decompress(chunks[b"IDAT"])  # raises on a wrong Adler-32
        assert rows == np.concatenate([np.zeros((shape[1], 1), np.uint8), picture.reshape(shape[1], -1)], 1).tobytes()


def test_tiny_pictures_are_stored_uncompressed_and_larger_ones_deflated(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tiny, larger = rng.integers(0, 256, (5, 8, 8), dtype=np.uint8), rng.integers(0, 256, (5, 40, 40), dtype=np.uint8)
    tiny_pngs = _rows(record_media(None, "test", np.arange(5), images=tiny, local_dir=tmp_path / "tiny").path)
    larger_pngs = _rows(record_media(None, "test", np.arange(5), images=larger, local_dir=tmp_path / "larger").path)
    assert tiny_pngs["image_png"] == stored_pngs(tiny)
    assert larger_pngs["image_png"] == [encode_png(picture) for picture in larger]


def test_boxes_are_stored_in_the_pixels_of_the_thumbnail_with_their_names(tmp_path: Path) -> None:
    scene = np.zeros((96, 128, 3), np.uint8)  # thumbnailed to 64 x 48: every coordinate halves
    small = np.zeros((32, 32, 3), np.uint8)  # stored as it is: coordinates unchanged
    summary = record_media(None, "val", [4, 2], images=[scene, small],
                           boxes=[np.array([[8.0, 16.0, 40.0, 96.0], [0.0, 0.0, 128.0, 2.0]]), np.zeros((0, 4))],
                           box_labels=[["cat", "dog"], []], local_dir=tmp_path)
    rows = _rows(summary.path)
    assert rows["sample_id"] == [2, 4]
    assert rows["boxes"] == [[], [{"x1": 4.0, "y1": 8.0, "x2": 20.0, "y2": 48.0, "label_name": "cat"},
                                  {"x1": 0.0, "y1": 0.0, "x2": 64.0, "y2": 1.0, "label_name": "dog"}]]
    assert _pixels(rows["image_png"][1]).shape == (48, 64, 3)
    unnamed = record_media(None, "val", [0], images=[small], boxes=[[[1, 2, 3, 4]]], local_dir=tmp_path / "b")
    assert _rows(unnamed.path)["boxes"] == [[{"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label_name": None}]]
    assert "boxes" not in _rows(record_media(None, "val", [0], images=[small], local_dir=tmp_path / "c").path)


@pytest.mark.parametrize("kwargs, message", [
    (dict(texts=["a", "b"], boxes=[[], []]), "boxes belong to images; pass images= with boxes="),
    (dict(images=GREY, box_labels=[[], []]), "box_labels without boxes; pass boxes= too"),
    (dict(images=GREY, boxes=[[]]), r"boxes must be a list of 2 arrays"),
    (dict(images=GREY, boxes=[[[1, 1, 0, 2]], []]), r"boxes 0 must be an \(n, 4\) array of finite x1y1x2y2 with x1 < x2"),
    (dict(images=GREY, boxes=[[[0, 0, 1]], []]), r"boxes 0 must be an \(n, 4\) array"),
    (dict(images=GREY, boxes=[[], [[0, 0, 1, 1]]], box_labels=[[], []]), r"box_labels 1 must hold 1 strings"),
    (dict(images=GREY, boxes=[[], []], box_labels=[[]]), r"box_labels must be a list of 2 lists"),
])
def test_bad_boxes_are_refused_naming_the_fix(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ActionScoresError, match=message):
        record_media(None, "test", [0, 1], local_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())
