"""What ending an epoch costs each rank under torch.distributed: gathered to rank 0, against a part per rank.

    python bench/bench_ranks.py                                  # 2 gloo ranks x 10M samples, both paths
    python bench/bench_ranks.py --samples 2000000 10000000 --out bench/results/ranks.md

Two CPU processes (gloo) each record their half of one epoch, `loss` + `target` + `p_true` in batches of
65,536 (rank r holds ids r, r + 2, ..., in a shuffled order, as a `DistributedSampler` hands them out), then call `LossRecorder.end_epoch` at the same moment. *gather*: the
shares are pickled to rank 0, which checks and writes the whole table (the path W&B runs keep, selected here
by the recorder's private `_gather_to_rank_0`). *parts*: every rank checks and writes its own sorted part;
the ranks exchange a few bytes (`distributed.agree`) and a byte per sample (`distributed.all_seen`). No
tracker, so each table is written inside `end_epoch` (with a tracker it is written on a writer thread). A
two-sample epoch is ended first, unmeasured, so that first-use costs (connections, codecs) stay out.
Each (samples, path) pair runs `--repeats` times in two fresh processes, the fastest shown; peak RSS is each process's high-water mark
(`ru_maxrss`), recording included, and "added" is how far `end_epoch` raised it above what was resident before.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracking.record.recorder import LossRecorder  # noqa: E402

BATCH = 65_536
WORLD = 2


def _resident_mb() -> float:
    """This process's resident memory now, MB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # KiB on Linux


def _rank(rank: int, samples: int, gather: bool, folder: str) -> None:
    """One rank: record its half of an epoch, end it, write its seconds and memory to `folder/rank<R>.json`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=WORLD)
    try:
        warm_up = LossRecorder("warm-up", num_samples=WORLD, local_dir=Path(folder) / f"rank{rank}")
        warm_up._gather_to_rank_0 = gather  # the first collectives and the first parquet write: not measured
        warm_up.update(torch.tensor([rank]), torch.ones(1), target=torch.zeros(1, dtype=torch.int64), p_true=torch.ones(1))
        warm_up.end_epoch(0)
        recorder = LossRecorder("train", num_samples=samples, local_dir=Path(folder) / f"rank{rank}")
        recorder._gather_to_rank_0 = gather
        generator = torch.Generator().manual_seed(rank)
        ids = torch.arange(rank, samples, WORLD)
        ids = ids[torch.randperm(ids.shape[0], generator=generator)]  # in a shuffled order, as a training pass's
        loss = torch.rand(ids.shape[0], generator=generator) * 5
        target = torch.randint(0, 1000, (ids.shape[0],), generator=generator)
        p_true = torch.rand(ids.shape[0], generator=generator)
        for start in range(0, ids.shape[0], BATCH):
            end = start + BATCH
            recorder.update(ids[start:end], loss[start:end], target=target[start:end], p_true=p_true[start:end])
        del loss, target, p_true
        before_resident, before_peak = _resident_mb(), _peak_mb()
        dist.barrier()
        started = time.perf_counter()
        written = recorder.end_epoch(0)
        seconds = time.perf_counter() - started
        peak = _peak_mb()
        dist.barrier()
        result = {"seconds": seconds, "peak_mb": peak, "added_mb": max(0.0, peak - max(before_peak, before_resident)),
                  "file_mb": written.stat().st_size / 1e6 if written is not None else 0.0}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(samples: int, gather: bool) -> list[dict[str, float]]:
    """Both ranks' results for one epoch of `samples`, gathered (`gather`) or in parts."""
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as folder:
        mp.spawn(_rank, args=(samples, gather, folder), nprocs=WORLD, join=True)
        return [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--repeats", type=int, default=3, help="fresh process pairs per row; the fastest is shown")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ranks.md"))
    args = parser.parse_args()
    rows = ["| samples | path | rank 0: `end_epoch` | rank 0: peak RSS (added) | rank 1: `end_epoch` | "
            "rank 1: peak RSS (added) | files written | every run, rank 0/rank 1 |",
            "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    loads = [os.getloadavg()[0]]
    paths = (("gather", True), ("parts", False))
    for samples in args.samples:
        runs: dict[str, list[list[dict[str, float]]]] = {path: [] for path, _ in paths}
        for _ in range(args.repeats):  # the two paths alternate, so that drift of a shared machine falls on both
            for path, gather in paths:
                runs[path].append(measure(samples, gather))
                loads.append(os.getloadavg()[0])
        for path, gather in paths:
            zero, one = (min((run[rank] for run in runs[path]), key=lambda result: result["seconds"])
                         for rank in (0, 1))
            spread = ", ".join(f"{run[0]['seconds']:.2f}/{run[1]['seconds']:.2f}" for run in runs[path])
            files = (f"one table, {zero['file_mb']:.0f} MB" if gather
                     else f"two parts, {zero['file_mb']:.0f} + {one['file_mb']:.0f} MB")
            rows.append(f"| {samples:,} | {path} | {zero['seconds']:.2f} s | {zero['peak_mb']:,.0f} MB "
                        f"(+{zero['added_mb']:,.0f}) | {one['seconds']:.2f} s | {one['peak_mb']:,.0f} MB "
                        f"(+{one['added_mb']:,.0f}) | {files} | {spread} |")
            print(rows[-1], flush=True)
    command = f"python bench/bench_ranks.py --repeats {args.repeats} --samples " + " ".join(map(str, args.samples))
    text = ("# Ending an epoch under torch.distributed: gathered to rank 0 against a part per rank\n\n"
            f"2 gloo processes on this machine ({os.cpu_count()} cores), one epoch of `loss` + `target` + `p_true`, "
            "no tracker (each table written inside `end_epoch`). Peak RSS is the process's high-water mark, "
            "recording included; in brackets, how far `end_epoch` raised it. Each row is the fastest of "
            f"{args.repeats} runs in fresh processes (every run's seconds in the last column). Load average (1 min) during the runs: "
            f"{min(loads):.1f}-{max(loads):.1f}.\n\n"
            + "\n".join(rows) + f"\n\n    {command}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
