"""The training loop every experiment shares: classification and detection alike.

A task brings a `step(model, batch) -> StepOutput` that returns unreduced per-sample
losses (a tensor, or a dict of parts whose sum is the objective) plus any per-sample
columns worth recording; the loop optimises the mean of the per-sample total and feeds
the recorders. Tracked splits are scored either by the training pass itself (free) or
by an evaluation pass in eval mode after each epoch (what the paper did on the test set).

Launched with `torchrun`, the loop joins the process group, trains a
DistributedDataParallel model on a DistributedSampler's share of every split, and lets
only rank 0 open the run; the other ranks attach to it (MLflow) and each rank's recorders
write that rank's part of every epoch, or, for a W&B run, the recorders gather the ranks'
shares to rank 0 (see `tracking.record.distributed`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from tracking import contract
from tracking.record import distributed
from tracking.record import IndexedDataset
from tracking.errors import ActionScoresError
from tracking.record.recorder import LossRecorder
from tracking.backends import TRACKERS, Tracker

Pass = Literal["train", "eval"]


@dataclass
class StepOutput:
    """Per-sample results of one batch: `losses` (tensor or dict of parts) and extra columns."""

    losses: torch.Tensor | dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor] = field(default_factory=dict)

    @cached_property
    def total(self) -> torch.Tensor:
        """Per-sample objective: the loss, or the sum of its parts (summed once per batch)."""
        if isinstance(self.losses, Mapping):
            return torch.stack(list(self.losses.values())).sum(dim=0)
        return self.losses


Step = Callable[[nn.Module, dict[str, torch.Tensor]], StepOutput]


class _StepModule(nn.Module):
    """A model and its step as one module: DistributedDataParallel then sees the whole step
    (any task's, detection's included) as its forward, and syncs the gradients of the
    per-sample objective."""

    def __init__(self, model: nn.Module, step: Step) -> None:
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.step(self.model, batch)


class _EvalShard(Sampler[int]):
    """This rank's share of an eval split under torchrun: every `world`-th sample, none repeated."""

    def __init__(self, dataset: Dataset, split: str) -> None:
        size, world = len(dataset), torch.distributed.get_world_size()  # type: ignore[arg-type]
        if size < world:  # a rank without samples would never join the eval metrics' gathering
            raise ActionScoresError(f"split {split!r} has {size} sample(s) for {world} processes: "
                                    f"track a split with at least one sample per process")
        self.indices = list(range(torch.distributed.get_rank(), size, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TrackedSplit:
    """A split whose per-sample losses are recorded every epoch, and how."""

    loader: DataLoader
    recorder: LossRecorder
    scored_by: Pass


def _to(batch: Any, device: torch.device) -> Any:
    """Move a batch (tensors, or lists/dicts of them, as detection batches are) to the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: _to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_to(value, device) for value in batch]
    return batch


class _Means:
    """Running means of per-sample values, kept on the device until read."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, out: StepOutput) -> None:
        # Labels and predicted classes are recorded per sample but their mean means nothing.
        values = {"loss": out.total.detach(),
                  **{k: v.detach() for k, v in out.columns.items() if k not in ("target", "prediction")}}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value.float().sum()
        self.count += out.total.shape[0]

    def read(self, prefix: str) -> dict[str, float]:
        """Means over every rank's samples (under torchrun, a training pass's padded duplicates included)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        device = self.sums[keys[0]].device
        count = torch.tensor(float(self.count), device=device)
        totals = distributed.all_reduce_sum(torch.stack([*(self.sums[k].double() for k in keys), count.double()]))
        *sums, total_count = totals.tolist()
        return {f"{prefix}_{key}": value / max(total_count, 1) for key, value in zip(keys, sums)}


def evaluate(model: nn.Module, step: Step, loader: DataLoader, recorder: LossRecorder | None,
             device: torch.device, split: str) -> dict[str, float]:
    """One pass over `split` in eval mode without gradients; records per-sample losses if asked."""
    model.eval()
    means = _Means()
    with torch.no_grad():
        for batch in tqdm(loader, desc=f"{split} eval", leave=False):
            batch = _to(batch, device)
            out = step(model, batch)
            means.add(out)
            if recorder is not None:
                recorder.update(batch["sample_id"], out.losses, **out.columns)
    return means.read(split)


def fit(
    model: nn.Module,
    step: Step,
    optimizer: torch.optim.Optimizer,
    train_loader: DataLoader,
    tracked: Mapping[str, TrackedSplit],
    epochs: int,
    tracker: Tracker | None,
    device: torch.device,
    epoch_metrics: Callable[[], Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Train for `epochs`, record every tracked split each epoch, log epoch metrics; return the last.

    Under torchrun only rank 0 logs the metrics (`tracker` on the others: their writer of parts, or None).
    `epoch_metrics`: called on every rank after the tracked splits each epoch, for metrics a task
    gathers during its eval passes (detection's mAP); what it returns is logged with the rest.
    """
    train_recorder = next((t.recorder for t in tracked.values() if t.scored_by == "train"), None)
    runner: nn.Module = _StepModule(model, step)
    if distributed.active():
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    metrics: dict[str, float] = {}
    for epoch in tqdm(range(epochs), desc="epochs", disable=not distributed.is_main()):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)  # a new shuffle every epoch, the same on every rank
        runner.train()
        means = _Means()
        for batch in tqdm(train_loader, desc="train", leave=False):
            batch = _to(batch, device)
            out = runner(batch)
            optimizer.zero_grad(set_to_none=True)
            out.total.mean().backward()
            optimizer.step()
            means.add(out)
            if train_recorder is not None:
                train_recorder.update(batch["sample_id"], out.losses, **out.columns)
        metrics = means.read("train")
        for split, spec in tracked.items():
            if spec.scored_by == "eval":
                metrics |= evaluate(model, step, spec.loader, spec.recorder, device, split)
            spec.recorder.end_epoch(epoch)
        if epoch_metrics is not None:
            metrics |= epoch_metrics()
        if tracker is not None and distributed.is_main():
            tracker.log_metrics(metrics, step=epoch)  # never waits for the network
    return metrics


def add_experiment_arguments(parser: argparse.ArgumentParser, epochs: int, batch_size: int, track: str) -> None:
    """The settings every experiment shares (the MLproject entry points pass the same names)."""
    parser.add_argument("--data-root", default="", help="data folder, for datasets that are not embedded")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--track", default=track, help=f"splits to record, e.g. {track}, train, train:eval, {track},train")
    parser.add_argument("--experiment", default="", help="experiment (MLflow) or project (W&B); default: the active one")
    parser.add_argument("--tracker", default="mlflow", choices=sorted(TRACKERS))
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--save-model", default="", help="write the trained weights (a state dict) to this file")


def parse_track(spec: str, splits: Sequence[str], train_split: str = "train") -> dict[str, Pass]:
    """`test`, `train,test`, `train:eval`: the splits to record and how each is scored.

    The train split defaults to the training pass (free); any other split to an eval pass.
    """
    tracked: dict[str, Pass] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        split, _, scored_by = item.partition(":")
        scored_by = scored_by or ("train" if split == train_split else "eval")
        if split not in splits or scored_by not in ("train", "eval"):
            raise ActionScoresError(
                f"bad track item {item!r}: use one of {list(splits)}, optionally with :train or :eval"
            )
        if scored_by == "train" and split != train_split:
            raise ActionScoresError(f"track {item!r}: only the {train_split} split can be scored by the training pass")
        tracked[split] = scored_by  # type: ignore[assignment]
    if not tracked:
        raise ActionScoresError(f"track is empty: name at least one split of {list(splits)}")
    return tracked


def _recorder(split: str, size: int, ids: np.ndarray | None, tracker: Tracker | None) -> LossRecorder:
    """The split's recorder; a selection's ids are sorted original positions, so the last bounds them."""
    if ids is None:
        return LossRecorder(split, size, tracker)
    return LossRecorder(split, int(ids[-1]) + 1, tracker, sample_ids=ids)


def _open_run(make: Callable[[], Tracker], experiment: str | None, run_name: str, params: Mapping[str, object],
              tags: Mapping[str, str]) -> Tracker:
    """A started run with its params and tags; one that started but could not take them is marked failed."""
    run_tracker = make()
    run_tracker.start(experiment=experiment, run_name=run_name)
    try:
        run_tracker.write_params(params)
        run_tracker.set_tags(tags)
    except BaseException:
        run_tracker.finish(failed=True)
        raise
    return run_tracker


def train_and_record(
    *,
    tracker: Callable[[], Tracker],
    experiment: str | None,
    run_name: str,
    params: Mapping[str, object],
    model: nn.Module,
    step: Step,
    optimizer: torch.optim.Optimizer,
    datasets: Mapping[str, Dataset],
    tracked_passes: Mapping[str, Pass],
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    train_split: str = "train",
    save_model: str = "",
    epoch_metrics: Callable[[], Mapping[str, float]] | None = None,
    sample_ids: Mapping[str, np.ndarray] | None = None,
    tags: Mapping[str, str] | None = None,
    media: Mapping[str, Callable[[LossRecorder, np.ndarray], object]] | None = None,
) -> dict[str, float]:
    """Open a run, log `params`, train with every tracked split recorded each epoch, close the run.

    `datasets` maps split name to a dataset of `(input, target)` items; sample ids are
    positions in it. The run is marked failed if training raises. Prints
    `run <id> finished: <last epoch's metrics>` and returns those metrics. `save_model`:
    a file for the trained weights. `epoch_metrics`: see `fit`. Under torchrun (WORLD_SIZE > 1) every rank trains on
    its share and records it, and only rank 0 opens the run, logs, saves and prints:
    `tracker` makes the tracker, and is called on rank 0 only; the other ranks attach to the run
    rank 0 opened where several processes can write it (MLflow, `distributed.share_run`) and
    upload their own parts of each epoch. `sample_ids`: per split, the sorted original id of each item of
    a dataset that is a selection of its split (`experiments.datasets.select_samples`), so ids keep
    their meaning and left-out ids are absent from the tables. `tags`: set on the run at its start.
    `media`: per tracked split, a function of its recorder and its sample ids that records what the
    panels show of them (`LossRecorder.record_media`), called once before training.
    """
    sample_ids = sample_ids or {}
    joined = distributed.init_from_env(device)
    main = distributed.is_main()

    def loader(split: str, shuffle: bool, scored_by: Pass = "train") -> DataLoader:
        indexed = IndexedDataset(datasets[split], sample_ids.get(split))
        if distributed.active():
            # Training needs as many batches on every rank (DDP syncs each backward), so DistributedSampler
            # pads the shares with copies, which the recorder drops. An eval pass has no collectives: its
            # shares are disjoint and unpadded, so its metrics (mean losses, mAP) count every sample once.
            sampler = _EvalShard(indexed, split) if scored_by == "eval" else \
                DistributedSampler(indexed, shuffle=shuffle, seed=seed)
            return DataLoader(indexed, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn,
                              sampler=sampler)
        return DataLoader(indexed, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                          collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed))

    run_tracker: Tracker | None = None
    try:
        opening_error = None
        if main:
            try:
                run_tracker = _open_run(tracker, experiment, run_name, {
                    **params, **{contract.SCORED_BY_PREFIX + s: p for s, p in tracked_passes.items()}}, tags or {})
            except Exception as error:  # told to every rank: the others would wait for rank 0 in DDP's constructor
                opening_error = error
        distributed.agree(opening_error, "opening the run on rank 0")
        try:
            run_tracker = distributed.share_run(run_tracker)
            tracked = {
                split: TrackedSplit(loader(split, False, scored_by), _recorder(split, len(datasets[split]),
                                                                            sample_ids.get(split), run_tracker),
                                    scored_by)
                for split, scored_by in tracked_passes.items()
            }
            for split, record in (media or {}).items():
                ids = sample_ids.get(split)
                record(tracked[split].recorder, np.arange(len(datasets[split])) if ids is None else ids)
            metrics = fit(model, step, optimizer, loader(train_split, shuffle=True), tracked, epochs, run_tracker,
                          device, epoch_metrics)
            if save_model and main:
                torch.save(model.state_dict(), save_model)
            distributed.finish_run(run_tracker)  # rank 0 ends the run after every rank's uploads
        except BaseException:
            if run_tracker is not None:
                distributed.finish_run(run_tracker, failed=True)
            raise
    finally:
        if joined:
            torch.distributed.destroy_process_group()
    if run_tracker is not None and main:
        print(f"run {run_tracker.run_id} finished: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics
