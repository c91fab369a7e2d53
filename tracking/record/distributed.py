"""Runs launched with `torchrun`: one process per device, one tracker per run.

Each rank records its own share of an epoch. Where several processes can write one run (MLflow:
`RunWriter.several_writers`), rank 0 opens the run, `share_run` broadcasts what the other ranks need
to attach to it, and at the end of every epoch each rank writes and uploads its own sorted part
(`per_sample_losses/<split>/epoch_EEEE/part-RRRRR.parquet`) through its own spool and uploader; only
small collectives remain (`agree`, `all_seen`). Where one process owns the run (a W&B run folder), the
shares are gathered to rank 0, which alone writes the epoch's table (`gather_shares`). A step that can
fail on one rank is followed by `agree`, so that every rank stops with the same error instead of
waiting in the next collective for a rank that has gone. Without an initialised process group
everything here is a no-op, so single-process code is unchanged.

`WORLD_SIZE`, `RANK`, `MASTER_ADDR` and `MASTER_PORT` describe the group: torchrun sets them,
and a launcher such as `srun` or a hand-rolled one sets them the same way.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tracking.errors import ActionScoresError

if TYPE_CHECKING:
    from tracking.backends.base import RunWriter

# One rank's share of an epoch, on the host: its sample ids and named columns.
Share = tuple[np.ndarray, dict[str, np.ndarray]]
T = TypeVar("T")
log = logging.getLogger(__name__)
# Seen flags reduced per collective in `all_seen`: 16 MiB, so that the collective's own buffers stay small.
SEEN_CHUNK = 1 << 24


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with the same variables) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 when not distributed."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the only process that opens (and ends) the run, logs its metrics and params."""
    return rank() == 0


def local_device() -> torch.device:
    """The device of this process: `cuda:<LOCAL_RANK>` under torchrun with GPUs, else cuda or cpu."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launched_by_torchrun():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cuda")


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); True if this call created it."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ActionScoresError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def gather_shares(share: T) -> list[T] | None:
    """Every rank's share, in rank order, on rank 0 (None on the other ranks).

    Any picklable share: a recorder's `Share`, an eval pass's detections. Rank order is what
    "first occurrence" means across processes: rank 0's batches
    first, in the order it received them, then rank 1's, and so on.
    """
    if not active():
        return [share]
    shares: list[T] | None = [None] * dist.get_world_size() if is_main() else None  # type: ignore[list-item]
    dist.gather_object(share, shares, dst=0)
    return shares


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over all ranks (itself when not distributed), e.g. for epoch metrics."""
    if active():
        values = values.clone()
        dist.all_reduce(values)
    return values


def agree(error: BaseException | None, what: str) -> None:
    """Every rank calls this after `what` with its own error, or None; if any rank failed, every rank raises
    the same `ActionScoresError` naming the first failing rank and its message.

    A collective (one small all-gather), so every rank must call it, failed or not. Without a process
    group the error itself is raised, unchanged.
    """
    agree_and_exchange(error, what, None)


def agree_and_exchange(error: BaseException | None, what: str, mine: T) -> list[T]:
    """`agree`, and every rank's `mine` (a small picklable value: a vote, column names) in rank order, from
    the same one all-gather. `[mine]` without a process group."""
    if not active():
        if error is not None:
            raise error
        return [mine]
    message = None if error is None else (str(error) if isinstance(error, ActionScoresError)
                                          else f"{type(error).__name__}: {error}")
    outcomes: list[tuple[str | None, T]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(outcomes, (message, mine))
    failed = [(position, text) for position, (text, _) in enumerate(outcomes) if text is not None]
    if failed:
        (first, text), others = failed[0], [position for position, _ in failed[1:]]
        also = f" (and on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
        raise ActionScoresError(f"{what} failed on rank {first} of {len(outcomes)}{also}: {text}") from error
    return [value for _, value in outcomes]


def all_seen(unique_ids: np.ndarray, num_samples: int) -> np.ndarray:
    """Whether any rank recorded each id of ``[0, num_samples)``: a uint8 flag per id, 1 where seen.

    Each rank sets the flags of its own (distinct, in-range) ids and the flags are all-reduced with MAX,
    `SEEN_CHUNK` ids per collective. Cost per epoch and split: `num_samples` bytes of flags on every rank
    (10 MB for 10M samples), and about 2 x `num_samples` x (W - 1) / W bytes sent and received by each of
    the W ranks (a ring all-reduce): 10 MB per rank at 2 ranks and 10M samples, against the whole split's
    columns pickled to rank 0 by a gather. On nccl each chunk goes through the rank's GPU.
    """
    seen = np.zeros(num_samples, dtype=np.uint8)
    seen[unique_ids] = 1
    if not active():
        return seen
    flags = torch.from_numpy(seen)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for start in range(0, num_samples, SEEN_CHUNK):
        chunk = flags[start:start + SEEN_CHUNK]
        if device is None:
            dist.all_reduce(chunk, op=dist.ReduceOp.MAX)  # in place, in `seen`
        else:
            on_device = chunk.to(device)
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
            chunk.copy_(on_device.cpu())
    return seen


def share_run(writer: RunWriter | None) -> RunWriter | None:
    """The run rank 0 opened, for every rank: rank 0's `writer` on rank 0; on the other ranks a writer of
    their own attached to the same run (MLflow: its tracking URI and run id, broadcast from rank 0), with a
    spool folder of its own (`RunWriter.writer_rank`), or None where the backend's run is one process's (W&B)
    and the ranks gather their shares to rank 0 instead. Every rank calls this (a broadcast, then `agree`)."""
    if not active():
        return writer
    shared: list[dict[str, Any] | None] = [writer.shared_run() if is_main() and writer is not None else None]
    dist.broadcast_object_list(shared, src=0)
    attached, error = (writer if is_main() else None), None
    if not is_main() and shared[0] is not None:
        try:
            attached = _attach(shared[0], rank())
        except Exception as attach_error:  # every rank learns it, instead of waiting at the first epoch's end
            error = attach_error
    agree(error, "attaching to rank 0's run")
    return attached


def _attach(shared: dict[str, Any], writer_rank: int) -> RunWriter:
    """A writer of rank `writer_rank` into the run `shared` describes (`RunWriter.shared_run`)."""
    from tracking.backends import make_tracker

    writer = make_tracker(shared["backend"], **shared.get("options", {}))
    writer.attach(shared["run_id"])
    writer.writer_rank = writer_rank
    return writer


def finish_run(writer: RunWriter | None, failed: bool = False) -> None:
    """End a run that every rank writes (`share_run`): each rank waits (bounded) for its own uploads, and
    rank 0 ends the run after the other ranks have, FAILED when a rank could not write one of its parts
    (raised on that rank, and on rank 0 naming it). Every rank calls this; without a process group, or on the
    way out of a failure (`failed`, when a rank may already be gone), each rank finishes alone, no collective."""
    if not active() or failed:
        if writer is not None:
            writer.finish(failed=failed)
        return
    error: BaseException | None = None
    if not is_main():
        try:
            if writer is not None:
                writer.finish()
        except Exception as finish_error:
            error = finish_error
    left = getattr(writer, "left_behind", "") if not is_main() else ""
    outcomes = agree_and_exchange(None, "", (None if error is None else str(error), left))
    if not is_main():
        if error is not None:
            raise error
        return
    broken = [(position, text) for position, (text, _) in enumerate(outcomes) if text is not None]
    behind = [(position, text) for position, (_, text) in enumerate(outcomes) if text]
    for position, text in behind:  # their spools hold them: `action-scores upload --spool` sends them later
        log.warning("rank %d of %d: %s; upload its spool before rank 0's, whose spool ends the run", position,
                    len(outcomes), text)
    if writer is not None:
        writer.finish(failed=bool(broken))
    if broken:
        position, text = broken[0]
        raise ActionScoresError(f"run {writer.run_id if writer else ''} ended FAILED: rank {position} of "
                                f"{len(outcomes)} could not write its parts: {text}")
