"""One rank of a two-process run for tests/test_distributed.py, started by torchrun or by hand (the variables
`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` set as `srun` or a hand-rolled launcher would set them).

    python tests/two_ranks.py bad-id | no-batch | tracker-fails  OUT_DIR

Writes (and prints) `OUT_DIR/rank<R>.txt`: `ok`, or `<error type>: <message>`, and then on a second line
`stopped after S s` (the seconds from this rank's start of the scenario); exits 1 on an error.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from experiments.loop import StepOutput, train_and_record
from tracking.backends import MLflowTracker
from tracking.record import distributed
from tracking.record.recorder import LossRecorder


def bad_id(rank: int) -> None:
    """Rank 0 records id 99 of a 4-sample split in epoch 1; rank 1 records its share well."""
    recorder = LossRecorder("test", num_samples=4)
    for epoch in range(2):
        recorder.update(torch.tensor([0, 2]) + rank, torch.ones(2))
        if rank == 0 and epoch == 1:
            recorder.update(torch.tensor([99]), torch.ones(1))
        recorder.end_epoch(epoch)


def no_batch(rank: int) -> None:
    """Rank 1 records nothing in epoch 0."""
    recorder = LossRecorder("test", num_samples=4)
    if rank == 0:
        recorder.update(torch.arange(4), torch.ones(4))
    recorder.end_epoch(0)


def tracker_fails(rank: int) -> None:
    """`experiments.loop.train_and_record` whose rank 0 cannot start its run (`MLFLOW_RUN_ID` names no run)."""
    def step(model: nn.Module, batch: dict) -> StepOutput:
        return StepOutput(nn.functional.mse_loss(model(batch["input"]).squeeze(1), batch["target"], reduction="none"))

    model = nn.Linear(1, 1)
    data = TensorDataset(torch.arange(8.0)[:, None], torch.arange(8.0))
    train_and_record(tracker=lambda: MLflowTracker(os.environ["MLFLOW_TRACKING_URI"]), experiment="two-ranks", run_name="r",
                     params={}, model=model, step=step, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     datasets={"train": data}, tracked_passes={"train": "train"}, epochs=1, batch_size=4, seed=0,
                     device=torch.device("cpu"))


SCENARIOS = {"bad-id": bad_id, "no-batch": no_batch, "tracker-fails": tracker_fails}

if __name__ == "__main__":
    scenario, out_dir = SCENARIOS[sys.argv[1]], Path(sys.argv[2])
    joined = distributed.init_from_env(torch.device("cpu")) if scenario is not tracker_fails else False
    rank = int(os.environ["RANK"])
    start = time.monotonic()
    try:
        scenario(rank)
        outcome = "ok"
    except Exception as error:  # what a user's script would show
        outcome = f"{type(error).__name__}: {error}"
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    report = f"{outcome}\nstopped after {time.monotonic() - start:.2f} s\n"
    (out_dir / f"rank{rank}.txt").write_text(report)
    print(f"rank {rank}: " + report.replace("\n", f"\nrank {rank}: ", 1), end="", flush=True)
    sys.exit(0 if outcome == "ok" else 1)
