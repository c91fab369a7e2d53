"""What recording costs during training, measured as ratios in one run (target: at most +2%).

    python bench/bench_overhead.py                      # 8192 synthetic 16x16 images, 7 repeats
    python bench/bench_overhead.py --samples 16384 --repeats 9 --threads 2

(a) Training pass: one epoch of the shared loop (`experiments.loop.fit`) without any
tracked split, against the same epoch recording the train split from the training pass
(`update` per batch, then `end_epoch`: gather, check, write the parquet table).
(b) Evaluation pass: a plain eval pass over the split, against the same pass recording
it and writing its table. Epochs alternate (plain, recorded, recorded, plain, ...) so
that drift of a shared machine falls on both; the figure is the median of the ratios of
neighbouring pairs. No tracker: uploading is the tracker's business, not the loop's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.classify import classification_step  # noqa: E402
from experiments.loop import TrackedSplit, evaluate, fit  # noqa: E402
from experiments.models import KerasCifarCNN  # noqa: E402
from tracking.record import IndexedDataset  # noqa: E402
from tracking.record.recorder import LossRecorder  # noqa: E402


def paired_ratios(plain: Callable[[], None], recorded: Callable[[], None], repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each call, alternating which goes first; (plain times, recorded times)."""
    plain_s, recorded_s = [], []
    for repeat in range(repeats):
        order = [(plain, plain_s), (recorded, recorded_s)]
        for run, times in order if repeat % 2 == 0 else reversed(order):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return plain_s, recorded_s


def report(name: str, plain_s: list[float], recorded_s: list[float]) -> None:
    """Median of neighbouring pairs' ratios, and the ratio of the fastest runs (least disturbed by neighbours)."""
    ratios = [r / p for p, r in zip(plain_s, recorded_s)]
    median, fastest = statistics.median(ratios), min(recorded_s) / min(plain_s)
    print(f"{name}: plain median {statistics.median(plain_s):.3f}s min {min(plain_s):.3f}s, recorded median "
          f"{statistics.median(recorded_s):.3f}s min {min(recorded_s):.3f}s\n"
          f"    recorded/plain: median of pairs {median:.4f} ({100 * (median - 1):+.2f}%), "
          f"fastest/fastest {fastest:.4f} ({100 * (fastest - 1):+.2f}%); pairs {', '.join(f'{r:.3f}' for r in ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(args.samples, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.samples,))
    data = IndexedDataset(TensorDataset(images, labels))
    train_loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    eval_loader = DataLoader(data, batch_size=args.batch_size * 4)
    model = KerasCifarCNN(3, 10, args.size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    device = torch.device("cpu")
    print(f"{args.samples} samples of 3x{args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.repeats} pairs, {torch.get_num_threads()} torch thread(s)")

    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        def recorder(split: str) -> LossRecorder:
            return LossRecorder(split, args.samples, tracker=None, local_dir=tmp)

        train_recorder = recorder("train")

        def train_plain() -> None:
            fit(model, classification_step, optimizer, train_loader, {}, 1, None, device)

        def train_recorded() -> None:
            tracked = {"train": TrackedSplit(train_loader, train_recorder, "train")}
            fit(model, classification_step, optimizer, train_loader, tracked, 1, None, device)

        eval_recorder = recorder("test")

        def eval_plain() -> None:
            evaluate(model, classification_step, eval_loader, None, device, "test")

        def eval_recorded() -> None:
            evaluate(model, classification_step, eval_loader, eval_recorder, device, "test")
            eval_recorder.end_epoch(0)

        train_plain(), eval_plain()  # warm-up: allocator, kernels, imports
        report("training pass (epoch, train split recorded)", *paired_ratios(train_plain, train_recorded, args.repeats))
        report("evaluation pass (test split recorded)", *paired_ratios(eval_plain, eval_recorded, args.repeats))


if __name__ == "__main__":
    main()
