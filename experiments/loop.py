"""The training loop every experiment shares: classification and detection alike.

A task brings a `step(model, batch) -> StepOutput` that returns unreduced per-sample
losses (a tensor, or a dict of parts whose sum is the objective) plus any per-sample
columns worth recording; the loop optimises the mean of the per-sample total and feeds
the recorders. Tracked splits are scored either by the training pass itself (free) or
by an evaluation pass in eval mode after each epoch (what the paper did on the test set).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from tracking.data import IndexedDataset
from tracking.errors import ActionScoresError
from tracking.recorder import LossRecorder
from tracking.trackers import TRACKERS, Tracker

Pass = Literal["train", "eval"]


@dataclass
class StepOutput:
    """Per-sample results of one batch: `losses` (tensor or dict of parts) and extra columns."""

    losses: torch.Tensor | dict[str, torch.Tensor]
    columns: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        """Per-sample objective: the loss, or the sum of its parts."""
        if isinstance(self.losses, Mapping):
            return torch.stack(list(self.losses.values())).sum(dim=0)
        return self.losses


Step = Callable[[nn.Module, dict[str, torch.Tensor]], StepOutput]


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
        # Labels are recorded per sample but their mean means nothing.
        values = {"loss": out.total.detach(), **{k: v.detach() for k, v in out.columns.items() if k != "target"}}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value.float().sum()
        self.count += out.total.shape[0]

    def read(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{key}": float(total) / max(self.count, 1) for key, total in self.sums.items()}


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
    tracker: Tracker,
    device: torch.device,
) -> dict[str, float]:
    """Train for `epochs`, record every tracked split each epoch, log epoch metrics; return the last."""
    train_recorder = next((t.recorder for t in tracked.values() if t.scored_by == "train"), None)
    metrics: dict[str, float] = {}
    for epoch in tqdm(range(epochs), desc="epochs"):
        model.train()
        means = _Means()
        for batch in tqdm(train_loader, desc="train", leave=False):
            batch = _to(batch, device)
            out = step(model, batch)
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
        tracker.log_metrics_later(metrics, step=epoch)  # never waits for the network
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


def train_and_record(
    *,
    tracker: Tracker,
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
) -> dict[str, float]:
    """Open a run, log `params`, train with every tracked split recorded each epoch, close the run.

    `datasets` maps split name to a dataset of `(input, target)` items; sample ids are
    positions in it. The run is marked failed if training raises. Prints
    `run <id> finished: <last epoch's metrics>` and returns those metrics.
    """
    def loader(split: str, shuffle: bool) -> DataLoader:
        return DataLoader(IndexedDataset(datasets[split]), batch_size=batch_size, shuffle=shuffle,
                          num_workers=num_workers, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(seed))

    tracker.start(experiment=experiment, run_name=run_name)
    try:
        tracker.log_params({**params, **{f"action_scores.scored_by.{s}": p for s, p in tracked_passes.items()}})
        tracked = {
            split: TrackedSplit(loader(split, shuffle=False), LossRecorder(split, len(datasets[split]), tracker),
                                scored_by)
            for split, scored_by in tracked_passes.items()
        }
        metrics = fit(model, step, optimizer, loader(train_split, shuffle=True), tracked, epochs, tracker, device)
    except BaseException:
        tracker.finish(failed=True)
        raise
    tracker.finish()
    print(f"run {tracker.run_id} finished: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return metrics
