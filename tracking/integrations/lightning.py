"""Lightning: record each sample's loss every epoch, with no change to the `LightningModule`.

    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from tracking.integrations.lightning import ActionScoresCallback
    trainer = L.Trainer(max_epochs=20, logger=MLFlowLogger(...),
                        callbacks=[ActionScoresCallback({"test": test_set})])
    trainer.fit(model, train_loader)

One callback for both packages: `lightning.pytorch` (`pip install lightning`) and the older
`pytorch_lightning`. Each Trainer accepts only callbacks of its own package's `Callback`, so
the class derives from the `Callback` of every package installed.

Two ways to score a split (`tracking.record.recorder` explains both):
- evaluation pass (default, the paper's): after every training epoch the callback runs each
  tracked dataset through the module in eval mode, without gradients. Sample ids are the
  positions in the dataset. An item is `(input, target)` (or a dict with `input` and
  `target`); the module's forward gives the outputs, and the loss is their cross-entropy
  (`LossRecorder.update_classification`), or `loss_fn(outputs, targets)` for any other
  (`tracking.integrations.session.LossFn`, the same hook in every callback).
- training pass (`train_split="train"`): what `training_step` already computed, for free.
  `training_step` returns a dict with `"loss"` (what Lightning optimises) and
  `"sample_id"` (the batch's ids, e.g. from `tracking.IndexedDataset`), plus either
  `"losses"` (the unreduced per-sample losses) or `"logits"` and `"target"` (cross-entropy).

The tables go into the run of the trainer's `MLFlowLogger` or `WandbLogger` (of either
package), beside Lightning's own metrics. `tracker=` names the run otherwise: a backend
name (a run opened and ended here) or a configured `Tracker`. A trainer whose loggers are
all of other kinds (CSV, TensorBoard) and no `tracker=` is an error: the callback never
records into a run nobody asked for. Under DDP every rank scores its share of each dataset
(a `DistributedSampler`); with an MLflow run every rank attaches to it and uploads its own part of
each epoch (`epoch_EEEE/part-<rank>.parquet`), with a W&B run rank 0 gathers the shares and writes
each epoch's table, whole, once.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from tracking import contract
from tracking.backends import RunWriter
from tracking.errors import ActionScoresError
from tracking.integrations.session import (LossFn, RecordedRun, RecordingSession, TrackerChoice, check_media,
                                           deprecated, join_mlflow, join_wandb, open_run, writer_on_every_rank)
from tracking.record.recorder import Losses

PACKAGES = ("lightning.pytorch", "pytorch_lightning")  # the modern namespace first


def _installed() -> list[Any]:
    """The Lightning packages this environment has, modern first."""
    found = []
    for name in PACKAGES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ActionScoresError("no Lightning installed: pip install 'action-scores[lightning]' (or lightning)")
    return found


LIGHTNING = _installed()
PerSampleLoss = Callable[[Any, Any], Losses]  # the deprecated (module, batch) -> unreduced losses
# Keys of what `training_step` returns, for the training pass.
IDS_KEY, LOSSES_KEY, LOGITS_KEY, TARGET_KEY = contract.SAMPLE_ID, "losses", "logits", "target"
INPUT_KEY = "input"  # with TARGET_KEY: the keys of dict eval items, as `tracking.IndexedDataset` makes them


class _Positions(Dataset):
    """`(position, item)` pairs: the sample id travels with the user's item, whatever its form."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def _inputs_and_targets(batch: Any) -> tuple[Any, Any]:
    """An eval batch's inputs and targets: `(input, target)` items, or dicts with `input` and `target`."""
    if isinstance(batch, Mapping) and INPUT_KEY in batch and TARGET_KEY in batch:
        return batch[INPUT_KEY], batch[TARGET_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ActionScoresError(
        f"an eval batch is a {type(batch).__name__}; the eval pass takes (input, target) items or dicts with "
        f"{INPUT_KEY!r} and {TARGET_KEY!r}: give collate_fn= that makes one of those"
    )


class ActionScoresCallback(*(package.Callback for package in LIGHTNING)):  # type: ignore[misc]
    """Records per-sample losses of the tracked splits every epoch into the trainer's run.

    `splits`: split name -> dataset, scored by an evaluation pass after each training
    epoch (`batch_size`, `collate_fn` build its loader). `train_split`: the name under
    which the training pass is recorded (None: not recorded); `train_size` its number of
    samples (default: `len` of the training dataloader's dataset). `loss_fn`: see the
    module docstring. Deprecated: `eval_sets=` (now `splits`), `per_sample_loss(module, batch)`
    (now `loss_fn(outputs, targets)`). `media`: split -> keywords of `LossRecorder.record_media`
    (`images=`, `texts=` or `uris=`, `labels=`), recorded once so that panels need no data.
    `tracker`: where the tables go when the trainer has no MLflow or W&B logger: a backend name
    (`mlflow`, `wandb`, `both`: a run of `experiment` opened here and ended when fitting ends)
    or a configured `Tracker` (started here if it has no run yet; one already started is
    written into and left to its owner). A `Tracker` is used even beside such a logger.
    """

    def __init__(
        self,
        splits: Mapping[str, Dataset] | None = None,
        *,
        train_split: str | None = None,
        train_size: int | None = None,
        loss_fn: LossFn | None = None,
        batch_size: int = 256,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        media: Mapping[str, Mapping[str, Any]] | None = None,
        tracker: TrackerChoice = None,
        experiment: str | None = None,
        eval_sets: Mapping[str, Dataset] | None = None,
        per_sample_loss: PerSampleLoss | None = None,
    ) -> None:
        if eval_sets is not None:
            deprecated("ActionScoresCallback(eval_sets=...)", "ActionScoresCallback({'test': dataset}) (splits=)")
            splits = eval_sets
        if per_sample_loss is not None:
            deprecated("per_sample_loss(module, batch)", "loss_fn(outputs, targets)")
        self.splits = dict(splits or {})
        if not self.splits and train_split is None:
            raise ActionScoresError("nothing to record: give splits={'test': dataset} and/or train_split='train'")
        if train_split is not None and train_split in self.splits:
            raise ActionScoresError(f"split {train_split!r} is both an eval set and the training pass; rename one")
        for split, dataset in self.splits.items():
            contract.check_name("split", split)
            if isinstance(dataset, DataLoader) or not hasattr(dataset, "__len__"):
                raise ActionScoresError(
                    f"splits[{split!r}] must be a map-style Dataset (with __len__), got {type(dataset).__name__}: "
                    "pass the dataset itself, the callback builds the loader and numbers samples by position"
                )
        if train_size is not None and train_size <= 0:
            raise ActionScoresError(f"train_size must be positive, got {train_size}")
        if batch_size <= 0:
            raise ActionScoresError(f"batch_size must be positive, got {batch_size}")
        self.train_split = contract.check_name("split", train_split) if train_split is not None else None
        self.train_size = train_size
        self.loss_fn = loss_fn
        self.per_sample_loss = per_sample_loss
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.media = check_media(media, [*self.splits, *([train_split] if train_split else [])])
        self.tracker = tracker
        self.experiment = experiment
        self.session: RecordingSession | None = None
        self.run: RecordedRun | None = None  # set on rank 0 when training starts: where the tables go

    # --- when ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        scored_by = {**{split: "eval" for split in self.splits},
                     **({self.train_split: "train"} if self.train_split else {})}
        writer, finish_writer = writer_on_every_rank(lambda: self._writer(trainer), trainer.is_global_zero)
        self.session = RecordingSession(writer, scored_by, self.media, finish_writer)
        self.run = self.session.run
        for split, dataset in self.splits.items():  # media checked now, before the first epoch
            self.session.recorder(split, len(dataset))  # type: ignore[arg-type]

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.train_split is not None:
            self._record_training_step(trainer, outputs)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        session = self._session()
        if self.train_split in session.recorders:  # the training pass recorded this epoch's batches
            session.end_epoch(self.train_split, trainer.current_epoch)
        for split, dataset in self.splits.items():
            self._evaluate(trainer, pl_module, split, dataset)
            session.end_epoch(split, trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._session().close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(failed=True)

    # --- how ----------------------------------------------------------------------------------
    def _session(self) -> RecordingSession:
        if self.session is None:
            raise ActionScoresError("ActionScoresCallback used outside trainer.fit()")
        return self.session

    def _writer(self, trainer: Any) -> tuple[RunWriter, bool]:
        """The run the tables go to: a given `Tracker`, else the trainer's MLflow or W&B logger's run (either
        package's), else a run of the named backend; a trainer with only other loggers and no tracker is refused."""
        mlflow_loggers = tuple(package.loggers.MLFlowLogger for package in LIGHTNING)
        wandb_loggers = tuple(package.loggers.WandbLogger for package in LIGHTNING)
        if not isinstance(self.tracker, RunWriter):
            logger = next((lg for lg in trainer.loggers if isinstance(lg, mlflow_loggers + wandb_loggers)), None)
            if isinstance(logger, mlflow_loggers):
                return join_mlflow(logger.experiment.tracking_uri, logger.run_id), True
            if logger is not None:
                return join_wandb(logger.experiment), True
            if self.tracker is None:
                kinds = sorted(type(lg).__name__ for lg in trainer.loggers)
                raise ActionScoresError(
                    f"the trainer logs to {kinds or 'no logger'}, and action-scores writes only into an MLflow or "
                    "W&B run: add an MLFlowLogger or WandbLogger to the Trainer, or pass "
                    "ActionScoresCallback(..., tracker='mlflow') (a run of its own) or tracker=<a configured "
                    "tracking.backends Tracker>"
                )
        return open_run(self.tracker, self.experiment)

    def _record_training_step(self, trainer: Any, outputs: Any) -> None:
        """Translate what `training_step` returned into one `update` of the training pass."""
        assert self.train_split is not None
        if not isinstance(outputs, Mapping) or IDS_KEY not in outputs:
            got = f"keys {sorted(outputs)}" if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ActionScoresError(
                f"training pass of split {self.train_split!r}: training_step must return a dict with "
                f"{IDS_KEY!r} (the batch's sample ids: wrap the dataset in tracking.IndexedDataset) and "
                f"{LOSSES_KEY!r} (unreduced per-sample losses) or {LOGITS_KEY!r} and {TARGET_KEY!r}; got {got}"
            )
        size = self.train_size or len(trainer.train_dataloader.dataset)  # type: ignore[union-attr]
        recorder = self._session().recorder(self.train_split, size)
        if LOSSES_KEY in outputs:
            recorder.update(outputs[IDS_KEY], outputs[LOSSES_KEY])
        elif LOGITS_KEY in outputs and TARGET_KEY in outputs:
            recorder.update_classification(outputs[IDS_KEY], outputs[LOGITS_KEY], outputs[TARGET_KEY])
        else:
            raise ActionScoresError(
                f"training pass of split {self.train_split!r}: training_step returned keys {sorted(outputs)}; "
                f"add {LOSSES_KEY!r} (per-sample losses, reduction='none') or {LOGITS_KEY!r} and {TARGET_KEY!r}"
            )

    def _loader(self, trainer: Any, dataset: Dataset) -> DataLoader:
        """Positions and items in order; under DDP each rank gets its share (padded: the recorder keeps firsts)."""
        positions = _Positions(dataset)
        sampler = (DistributedSampler(positions, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                      shuffle=False) if trainer.world_size > 1 else None)
        return DataLoader(positions, batch_size=self.batch_size, sampler=sampler,
                          collate_fn=lambda pairs: (torch.tensor([i for i, _ in pairs]),
                                                    self.collate_fn([item for _, item in pairs])))

    def _evaluate(self, trainer: Any, module: Any, split: str, dataset: Dataset) -> None:
        """One evaluation pass over a tracked dataset, in eval mode without gradients, every batch recorded."""
        recorder = self._session().recorder(split, len(dataset))  # type: ignore[arg-type]
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                for sample_ids, batch in self._loader(trainer, dataset):
                    batch = trainer.strategy.batch_to_device(batch)
                    if self.per_sample_loss is not None:  # deprecated
                        recorder.update(sample_ids, self.per_sample_loss(module, batch))
                        continue
                    inputs, targets = _inputs_and_targets(batch)
                    if self.loss_fn is None:
                        recorder.update_classification(sample_ids, module(inputs), targets)
                    else:
                        recorder.update(sample_ids, self.loss_fn(module(inputs), targets))
        finally:
            module.train(was_training)
