"""The cost of recording media for panels: bytes per sample and seconds per 10,000 samples.

    python bench/bench_media.py                    # 10,000 samples of each kind
    python bench/bench_media.py --samples 2000     # quicker; times are scaled to 10,000

Times `tracking.record.record_media` (check, encode, write the parquet table; no tracker, so
no upload) on realistic content, all built offline:
- 32x32 RGB pictures (CIFAR-sized): crops of the two photos scikit-learn ships, shrunk to 32x32;
- 8x8 grey digits: scikit-learn's 1,797 digits, 0-16 scaled to 0-255;
- 224x224 RGB photos: crops of the same photos, stored as 64-px thumbnails;
- ~200-character texts: words of this repository's README drawn at random (no two alike; a
  small vocabulary, so real text of that length may take somewhat more).
Random pixels would compress far worse than photos do, so they are not used.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tracking.record.media import record_media  # noqa: E402


def photo_crops(count: int, side: int, shrink_to: int | None, seed: int = 0) -> list[np.ndarray]:
    """`count` random side x side crops of scikit-learn's sample photos, optionally shrunk to `shrink_to`."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photos
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = photo[top:top + side, left:left + side]
        if shrink_to is not None:
            crop = np.asarray(Image.fromarray(crop).resize((shrink_to, shrink_to), Image.Resampling.LANCZOS))
        crops.append(crop)
    return crops


def digits(count: int) -> np.ndarray:
    """Up to `count` 8x8 uint8 digits: scikit-learn has 1,797, none repeated (zstd would store repeats
    almost for free), so fewer samples are timed and the time is scaled to 10,000."""
    from sklearn.datasets import load_digits

    return (load_digits().images[:count] * (255 / 16)).round().astype(np.uint8)


def texts(count: int, length: int = 200, seed: int = 0) -> list[str]:
    """`count` texts of about `length` characters: runs of the README's words from random places, so
    that no two texts repeat (repeated slices would let zstd store them almost for free)."""
    words = (ROOT / "README.md").read_text().split()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        chunk: list[str] = []
        while sum(len(w) + 1 for w in chunk) < length:
            chunk.append(words[rng.integers(len(words))])
        out.append(" ".join(chunk))
    return out


def measure(name: str, folder: Path, **media: object) -> None:
    count = len(next(iter(media.values())))  # type: ignore[arg-type]
    started, cpu = time.perf_counter(), time.process_time()
    summary = record_media(None, "bench", np.arange(count), labels=["label"] * count, local_dir=folder, **media)
    per_10k = 10_000 / count
    wall, cpu = (time.perf_counter() - started) * per_10k, (time.process_time() - cpu) * per_10k
    print(f"{name:<26} {count:>6,} {summary.kind:>5} {summary.bytes_per_sample:>7.0f} B/sample"
          f"   per 10,000: {wall:>6.2f} s wall, {cpu:>6.2f} s CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    n = parser.parse_args().samples
    print(f"record_media, {n:,} samples each (bytes: the parquet table; time: check + encode + write;\n"
          "CPU time is the cost on a shared machine, wall time includes waiting for a core)")
    with tempfile.TemporaryDirectory() as work:
        cases = {
            "32x32 RGB (photo crops)": dict(images=photo_crops(n, 96, 32)),
            "8x8 digits": dict(images=digits(n)),
            "224x224 photos -> 64 px": dict(images=photo_crops(n, 224, None, seed=1)),
            "~200-char texts": dict(texts=texts(n)),
        }
        for index, (name, media) in enumerate(cases.items()):
            measure(name, Path(work) / str(index), **media)


if __name__ == "__main__":
    main()
