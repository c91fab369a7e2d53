"""`tracking.record.png`: the numpy-framed PNGs decode, in PIL, to exactly the pixels they were made of."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from tracking.record.png import MAX_STORED_BYTES, stored_pngs


@pytest.mark.parametrize("shape, mode", [((5, 8, 8), "L"), ((3, 6, 9, 3), "RGB"), ((1, 1, 1), "L")])
def test_every_picture_decodes_to_its_own_pixels(shape: tuple[int, ...], mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    pngs = stored_pngs(pixels)
    assert len(pngs) == shape[0]
    for png, picture in zip(pngs, pixels):
        decoded = Image.open(io.BytesIO(png))
        decoded.load()  # checks every chunk's CRC and the zlib stream's Adler-32
        assert decoded.mode == mode
        np.testing.assert_array_equal(np.asarray(decoded), picture)


def test_the_checksums_are_zlibs_own() -> None:
    """The Adler-32 numpy computes is the one zlib computes of the same rows, for bytes up to 255."""
    pixels = np.full((2, 4, 4), 255, dtype=np.uint8)
    pixels[1] = np.arange(16, dtype=np.uint8).reshape(4, 4)
    for png, picture in zip(stored_pngs(pixels), pixels):
        rows = b"".join(b"\x00" + row.tobytes() for row in picture)  # filter byte 0 before each row
        start = png.index(b"IDAT") + 4
        stream = png[start:start + 2 + 5 + len(rows) + 4]
        assert stream[-4:] == zlib.adler32(rows).to_bytes(4, "big")
        assert zlib.decompress(stream) == rows


def test_a_picture_beyond_one_stored_block_is_refused() -> None:
    side = int(np.sqrt(MAX_STORED_BYTES)) + 2
    with pytest.raises(ValueError, match=r"bytes do not fit one stored deflate block"):
        stored_pngs(np.zeros((1, side, side), dtype=np.uint8))
