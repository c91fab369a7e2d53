"""`tracking.report.pictures`: word wrap, text cards that say when they are cut, boxes where the boxes are,
crisp upscaling, and local image files read or refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tracking.report.pictures import (BOX_COLOUR, CARD_SIZE, draw_boxes, local_picture, text_card, upscale,
                                      upscale_factor, wrap_to_width)


def test_wrap_is_greedy_and_cuts_a_word_longer_than_a_line() -> None:
    fits = lambda line: len(line) <= 10  # noqa: E731 - ten characters a line
    assert wrap_to_width("the cat sat on the mat today", fits) == ["the cat", "sat on the", "mat today"]
    assert wrap_to_width("see https://example.org/a/b ok", fits) == ["see", "https://ex", "ample.org/", "a/b ok"]
    assert wrap_to_width("", fits) == [""]


def test_a_card_holds_its_text_and_a_long_text_is_cut_with_an_ellipsis() -> None:
    blank = text_card("")
    assert blank.shape == (CARD_SIZE[1], CARD_SIZE[0], 3) and blank.dtype == np.uint8
    short = text_card("hello")
    inked_rows = np.flatnonzero((short < 128).any(axis=(1, 2)))
    assert 0 < inked_rows.size and inked_rows.max() < 30  # one line, at the top
    long = text_card(" ".join(["word"] * 400))
    assert (long < 128).any(axis=(1, 2)).sum() > 8 * inked_rows.size  # every line used
    np.testing.assert_array_equal(long, text_card(" ".join(["word"] * 401)))  # cut where the card ends: the same card


def test_boxes_are_drawn_on_their_pixels_scaled_with_the_picture() -> None:
    scene = np.zeros((32, 32, 3), dtype=np.uint8)
    drawn = draw_boxes(scene, np.array([[4, 4, 12, 20]]), ["cat"], min_side=64)
    assert upscale_factor(scene, 64) == 2 and drawn.shape == (64, 64, 3)
    red = np.all(drawn == BOX_COLOUR, axis=2)
    assert red[8, 8:24].all() and red[8:40, 8].all()  # top and left edges, at twice the box's pixels
    assert not red[50:, 50:].any()  # nothing outside the box


def test_upscaling_repeats_each_pixel() -> None:
    digit = np.arange(4, dtype=np.uint8).reshape(2, 2)
    assert upscale(digit, min_side=4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_a_local_image_is_read_as_a_thumbnail_and_anything_else_is_none(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    np.testing.assert_array_equal(local_picture(str(tmp_path / "x.png")), pixels)
    assert local_picture(f"file://{tmp_path / 'x.png'}").shape == (40, 20, 3)
    assert local_picture(str(tmp_path / "x.png"), side=10).shape == (10, 5, 3)
    (tmp_path / "notes.png").write_text("not a picture")
    assert local_picture(str(tmp_path / "notes.png")) is None
    assert local_picture(str(tmp_path / "missing.png")) is None
    assert local_picture("https://example.org/x.png") is None
