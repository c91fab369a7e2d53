"""What every framework callback shares: the run, one `LossRecorder` per tracked split, media once.

The callbacks in this package only translate their framework's events into calls here
(STYLE.md: keep hooks thin). A session writes into the run the framework's own logger
opened (`join_mlflow`, `join_wandb`), so the tables sit beside the framework's metrics,
or opens a run of its own (`open_run`) and closes it again. Under several processes rank 0
opens or joins the run; the other ranks attach writers of their own to an MLflow run
(`distributed.share_run`) and every rank writes its part of each epoch, while for a W&B run
only rank 0 has a writer and `end_epoch` gathers the shares to it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tracking import contract
from tracking.backends import MLflowTracker, RunWriter, WandbTracker, make_tracker
from tracking.backends.uploads import unwritten_error
from tracking.errors import ActionScoresError
from tracking.record import distributed
from tracking.record.ids import checked_sample_ids
from tracking.record.media import MediaSummary, record_media
from tracking.record.recorder import LossRecorder, Losses

if TYPE_CHECKING:
    from tracking.analyze import AnalysisResult

# What a callback's `media={split: {...}}` may hold: the keywords of `record_media`, read from its signature so the
# two never drift apart, less `local_dir`, which the session sets itself.
MEDIA_KEYS = frozenset(name for name, parameter in inspect.signature(record_media).parameters.items()
                       if parameter.kind is inspect.Parameter.KEYWORD_ONLY) - {"local_dir"}


class _JoinedWandbRun(WandbTracker):
    """A W&B run the user's framework opened: written into, never finished here (its owner finishes it)."""

    def __init__(self, run: Any) -> None:
        offline = run.settings.mode in ("offline", "dryrun")  # Lightning's WandbLogger(offline=True) says dryrun
        super().__init__(project=run.project, mode="offline" if offline else run.settings.mode)
        self._live = run
        self._run_id = run.id

    def finish(self, failed: bool = False) -> None:
        """Wait (bounded) for the tables handed to `log_table`, and leave the run open for its owner: a table
        that could not be written is raised, since the owner's own `finish` would end the run with a gap."""
        unwritten = self._close_table_uploads()
        self._live = None
        if unwritten and not failed:
            raise unwritten_error(self.run_id, unwritten)


def join_mlflow(tracking_uri: str, run_id: str) -> MLflowTracker:
    """A writer into an MLflow run someone else opened and will end (Lightning's `MLFlowLogger`,
    the Trainer's `report_to="mlflow"`): its `finish` waits for the queued tables, and leaves the run open."""
    writer = MLflowTracker(tracking_uri)
    writer.attach(run_id)
    return writer


def join_wandb(run: Any) -> RunWriter:
    """A writer into a live `wandb` run someone else opened and will finish."""
    return _JoinedWandbRun(run)


# The one per-sample loss hook of every callback: `loss_fn(outputs, targets) -> unreduced losses`, a 1-D tensor
# (one loss per sample) or a dict of parts. `outputs`: what the model returned for the batch (Lightning: the
# module's forward; Hugging Face: the model's output, `outputs.logits`; Keras: the predictions, a tensor);
# `targets`: the batch's targets (Hugging Face: its `labels`). The order of torch's losses:
# `functools.partial(F.cross_entropy, reduction="none")` is one.
LossFn = Callable[[Any, Any], Losses]


def deprecated(old: str, new: str) -> None:
    """Warn that a callback argument's old spelling goes in the next release, naming the new one."""
    warnings.warn(f"action-scores: {old} is deprecated and will be removed in the next release; use {new}",
                  DeprecationWarning, stacklevel=3)


# What a callback's `tracker=` takes: a backend name, a configured `Tracker`, or None (the framework's own logger).
TrackerChoice = str | RunWriter | None


def _has_run(writer: RunWriter) -> bool:
    try:
        writer.run_id
    except ActionScoresError:
        return False
    return True


def open_run(tracker: str | RunWriter, experiment: str | None) -> tuple[RunWriter, bool]:
    """The writer of a callback's `tracker=`, and whether the session finishes it (`RecordingSession.finish_writer`).

    A configured `Tracker`: started here (into `experiment`) if it has no run yet, and then finished here;
    one already started is written into and left to its owner, whose `finish` waits for the tables.
    A name (`mlflow`, `wandb`, `both`): for `mlflow` or `wandb` the run this process already has
    active (`with mlflow.start_run():`, `wandb.init()`), joined, else a new run of that backend."""
    if isinstance(tracker, RunWriter):
        if _has_run(tracker):
            return tracker, False
        tracker.start(experiment=experiment or None)
        return tracker, True
    return _run_of(tracker, experiment), True


def _run_of(tracker: str, experiment: str | None) -> RunWriter:
    if tracker == MLflowTracker.name:
        import mlflow

        active = mlflow.active_run()
        if active is not None:
            return join_mlflow(mlflow.get_tracking_uri(), active.info.run_id)
    if tracker == WandbTracker.name:
        import wandb

        if wandb.run is not None:
            return join_wandb(wandb.run)
    writer = make_tracker(tracker)
    writer.start(experiment=experiment or None)
    return writer


def check_media(media: Mapping[str, Mapping[str, Any]] | None, splits: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`media` maps a tracked split to the keywords of `record_media` (images, texts or uris, labels)."""
    media = dict(media or {})
    unknown = sorted(set(media) - set(splits))
    if unknown:
        raise ActionScoresError(f"media given for splits {unknown} that are not tracked; tracked: {sorted(splits)}")
    for split, keywords in media.items():
        bad = sorted(set(keywords) - MEDIA_KEYS)
        if bad:
            raise ActionScoresError(f"media[{split!r}]: unknown keys {bad}; use {sorted(MEDIA_KEYS)}")
    return {split: dict(keywords) for split, keywords in media.items()}


def check_sample_ids(split: str, sample_ids: Sequence[int] | np.ndarray, num_samples: int) -> None:
    """A tracked dataset's ids must be 0..n-1, each once: the tables are keyed by them across epochs."""
    checked_sample_ids(sample_ids, f"split {split!r}", num_samples, each_once=True, complete=True)


@dataclass(frozen=True)
class RecordedRun:
    """Where a session's tables went: what `tracking.analyze.analyze_run` needs to find the run again."""

    backend: str  # a name of `tracking.backends.TRACKERS`: "mlflow" or "wandb"
    run_id: str
    target: str  # what `Tracker.attach` takes: the MLflow run id, or the W&B offline run folder

    @classmethod
    def of(cls, writer: RunWriter) -> RecordedRun:
        first = getattr(writer, "trackers", [writer])[0]  # `both`: the MLflow run, as the job reads it
        folder = getattr(first, "offline_folder", None)
        return cls(first.name, first.run_id, str(folder) if folder is not None else first.run_id)

    def analyze(self, **options: Any) -> AnalysisResult:
        """The post-hoc job on this run, now (at the end of a script; `action-scores analyze` later works as
        well), printing what the command prints: status, splits, where the panels are.
        `options`: those of `tracking.analyze.analyze_run`."""
        from tracking.analyze import analyze_run, describe

        tracker = make_tracker(self.backend)
        result = analyze_run(tracker, self.target, **options)
        print(describe(result, tracker))
        return result


def writer_on_every_rank(open_on_rank0: Callable[[], tuple[RunWriter, bool]],
                         is_rank0: bool) -> tuple[RunWriter | None, bool]:
    """A callback's writer, and whether its session finishes it, on every rank of a DDP training.

    Rank 0 opens (or joins) the run with `open_on_rank0`; every rank learns if that failed, instead of
    waiting in the framework's next collective (`distributed.agree`); then the other ranks attach writers
    of their own to the same run and write their parts (`distributed.share_run`), or get None and gather
    their shares to rank 0 (W&B). Without a process group: `open_on_rank0()`'s writer, errors unchanged."""
    writer, finish_writer, failure = None, True, None
    if is_rank0:
        try:
            writer, finish_writer = open_on_rank0()
        except Exception as error:
            failure = error
    distributed.agree(failure, "starting the tracker on rank 0")
    return distributed.share_run(writer), finish_writer


class RecordingSession:
    """One run and the recorders of its tracked splits, for the length of one training.

    Under torchrun, rank 0's writer on rank 0; on the others their own writer into the same run
    (`distributed.share_run`: they write their parts), or None (W&B: they gather, rank 0 writes).
    Only rank 0 logs params and media.
    `close` ends the run only if the session opened it (`open_run`); a joined run
    (`join_mlflow`, `join_wandb`) is left to the framework that opened it, and a started
    `Tracker` the user passed (`finish_writer=False`) is not finished at all.
    `scored_by`: split -> "eval" or "train", logged as `action_scores.scored_by.<split>`.

    Nothing reaches the run before a split's first table has passed its checks: media is
    checked and encoded when a split is first seen, and handed over with the params after
    that table, so a bad loss, bad ids or bad media leave the run as it was.
    """

    def __init__(self, writer: RunWriter | None, scored_by: Mapping[str, str],
                 media: Mapping[str, Mapping[str, Any]], finish_writer: bool = True) -> None:
        self.writer = writer
        self.finish_writer = finish_writer
        self.run = RecordedRun.of(writer) if writer is not None else None
        self.scored_by = dict(scored_by)
        self.media = dict(media)
        self.recorders: dict[str, LossRecorder] = {}
        self._pending_media: dict[str, MediaSummary] = {}
        self._params_logged = False

    def recorder(self, split: str, num_samples: int) -> LossRecorder:
        """The split's recorder, made on first use (its media is checked and encoded then, on rank 0)."""
        recorder = self.recorders.get(split)
        if recorder is None:
            recorder = LossRecorder(split, num_samples, tracker=self.writer)
            if split in self.media and self.writer is not None and distributed.is_main():
                self._pending_media[split] = record_media(None, split, np.arange(num_samples), **self.media[split],
                                                          local_dir=self.writer.spool_dir)
            self.recorders[split] = recorder
        elif recorder.num_samples != num_samples:
            raise ActionScoresError(f"split {split!r} had {recorder.num_samples} samples, now {num_samples}: "
                                    "track one fixed dataset per split")
        return recorder

    def end_epoch(self, split: str, epoch: int) -> None:
        """Write the split's table of `epoch` (this rank's part, or rank 0's gathered table); after the
        first table also the params and the split's media (rank 0)."""
        self.recorders[split].end_epoch(epoch)
        if self.writer is None or not distributed.is_main():
            return
        if not self._params_logged:
            self.writer.log_params({contract.SCORED_BY_PREFIX + name: how
                                          for name, how in self.scored_by.items()})
            self._params_logged = True
        media = self._pending_media.pop(split, None)
        if media is not None and media.path is not None:
            self.writer.log_artifact(media.path, contract.media_dir(split))

    def close(self, failed: bool = False) -> None:
        """Wait for the queued tables; end the run only if this session opened it. Under torchrun every rank
        closes (`distributed.finish_run`: rank 0 ends the run after the others' uploads)."""
        writer, self.writer = self.writer, None
        if not self.finish_writer and distributed.is_main():
            writer = None  # the user's started tracker: they finish it (the other ranks' own writers still close)
        if distributed.active() and not failed:
            distributed.finish_run(writer)
        elif writer is not None:
            writer.finish(failed=failed)


__all__ = ["LossFn", "RecordedRun", "RecordingSession", "TrackerChoice", "check_media", "check_sample_ids",
           "deprecated", "join_mlflow", "join_wandb",
           "open_run", "writer_on_every_rank"]
