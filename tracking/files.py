"""The one atomic file write: readers (an uploader, a resumed process, the job) see the old file or the new one,
never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(partial)` makes the file at a partial path beside `path`, which is then renamed over `path`
    (`os.replace`: atomic on one file system). A `write` that raises leaves `path` as it was and no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
