"""Runs launched with `torchrun`: one process per device, one tracker per run.

Each rank records its own share of an epoch; at the end of the epoch the shares are
gathered to rank 0, which alone writes the table and talks to the tracker. A step that can
fail on one rank is followed by `agree`, so that every rank stops with the same error
instead of waiting in the next collective for a rank that has gone. Without an initialised
process group everything here is a no-op, so single-process code is unchanged.

`WORLD_SIZE`, `RANK`, `MASTER_ADDR` and `MASTER_PORT` describe the group: torchrun sets them,
and a launcher such as `srun` or a hand-rolled one sets them the same way.
"""

from __future__ import annotations

import os
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from tracking.errors import ActionScoresError

# One rank's share of an epoch, on the host: its sample ids and named columns.
Share = tuple[np.ndarray, dict[str, np.ndarray]]
T = TypeVar("T")


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
    """Rank 0: the only process that opens the run and writes to the tracker."""
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
    if not active():
        if error is not None:
            raise error
        return
    message = None if error is None else (str(error) if isinstance(error, ActionScoresError)
                                          else f"{type(error).__name__}: {error}")
    outcomes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, message)
    failed = [(position, text) for position, text in enumerate(outcomes) if text is not None]
    if failed:
        (first, text), others = failed[0], [position for position, _ in failed[1:]]
        also = f" (and on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
        raise ActionScoresError(f"{what} failed on rank {first} of {len(outcomes)}{also}: {text}") from error
