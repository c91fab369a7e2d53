"""`tracking.files` and `tracking.errors.preview`: a write that fails leaves the old file whole, a temporary
folder goes with its owner, thumbnails keep small pictures as they are, and ids in errors are cut short."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tracking.errors import preview
from tracking.files import THUMBNAIL_SIDE, encode_png, remove_with, temporary_folder, write_atomically


def test_a_write_that_fails_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "table.parquet"
    write_atomically(path, lambda partial: partial.write_bytes(b"first"))
    assert path.read_bytes() == b"first"

    def half_then_fail(partial: Path) -> None:
        partial.write_bytes(b"sec")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.parquet"]
    assert write_atomically(path, lambda partial: partial.write_bytes(b"second")) == path
    assert path.read_bytes() == b"second"


def test_a_temporary_folder_goes_when_its_owner_does() -> None:
    class Owner:
        pass

    owner = Owner()
    folder = remove_with(owner, temporary_folder())
    (folder / "epoch_0000.parquet").write_bytes(b"x")
    assert folder.name.startswith("action-scores-") and folder.is_dir()
    del owner
    gc.collect()
    assert not folder.exists()


def test_small_pictures_stay_as_they_are_and_large_ones_become_thumbnails() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (THUMBNAIL_SIDE, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(small)))), small)
    large = rng.integers(0, 256, (300, 150, 3), dtype=np.uint8)
    assert Image.open(io.BytesIO(encode_png(large))).size == (THUMBNAIL_SIDE // 2, THUMBNAIL_SIDE)  # aspect kept


def test_preview_cuts_long_lists_and_says_how_many_more() -> None:
    assert preview([3, 7, 9]) == "[3, 7, 9]"
    assert preview(range(25)) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] and 15 more"
    assert preview(np.array([5, 6]), limit=1) == "[5] and 1 more"
    assert preview([]) == "[]"
