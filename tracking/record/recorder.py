"""Per-sample loss recorder: the training-side half of the method.

Three lines in any PyTorch loop::

    recorder = LossRecorder("test", num_samples=len(test_set), tracker=tracker)
    recorder.update(batch["sample_id"], F.cross_entropy(logits, y, reduction="none"))
    recorder.end_epoch(epoch)  # writes and logs per_sample_losses/test/epoch_EEEE.parquet

For classification, ``recorder.update_classification(ids, logits, targets)`` records the loss,
the target and the training-dynamics columns in one call; ``recorder.record_media(ids, ...)``
records once what the panels show of each sample (`tracking.record.media`).

Two ways to score a split, both served by the same recorder:
- *evaluation pass*: after each epoch, run the split through the model in eval mode and
  record the losses (what the paper did on the test set; costs one forward pass);
- *training pass*: record the unreduced losses the optimiser already computed for its
  batches (free; the losses are taken mid-epoch, in train mode, with dropout on).

Rule for repeated ids within an epoch (a `DistributedSampler` pads its last shard with
copies of the first samples): the first occurrence received is kept, later ones are
dropped. A sample missing from the epoch or an id outside ``[0, num_samples)`` is an
error at ``end_epoch`` that names the ids.

Epochs: a recorder's first ``end_epoch`` may be any epoch (a resumed process starts where
its predecessor stopped); after it, each ``end_epoch`` ends the next one, so a skipped or
repeated number is refused, naming the expected one.

Under `torchrun` every rank records its own share of the epoch. With an MLflow run, rank 0
opens it and every rank gets a writer into it (`distributed.share_run`); ``end_epoch`` then
writes each rank's share as its own sorted part, `epoch_EEEE/part-<rank>.parquet`, uploaded
through that rank's spool, and only small collectives check the ranks together (`end_epoch`
says what they cost). With W&B (one process's run folder), or a tracker on rank 0 only, the
shares are gathered to rank 0, which alone writes the table. Either way "first occurrence"
means rank order: rank 0's batches in the order received, then rank 1's, and so on (for
parts, the reader keeps the first in part order). A mistake found on any rank (a rank
without batches, a bad id, a sample on no rank) is raised on every rank (`distributed.agree`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.files import remove_with, temporary_folder, write_atomically
from tracking.record import distributed
from tracking.record.columns import classification_outputs
from tracking.record.ids import checked_sample_ids
from tracking.record.media import DEFAULT_MAX_BYTES, MediaSummary, record_media

if TYPE_CHECKING:
    from tracking.backends.base import RunWriter

Losses = torch.Tensor | Mapping[str, torch.Tensor]

# `update_classification` keeps its batches' logits (references, on their device) and reduces them
# to the loss and dynamics columns in one go past this many values (16 MB of float32), or at the
# end of the epoch: a dozen tensor operations per epoch instead of per batch.
PENDING_LOGITS_LIMIT = 1 << 22


def write_table(table: pa.Table, path: Path) -> None:
    """Parquet laid out for size: sorted ids delta-packed (almost free), float losses
    byte-stream-split then zstd, other columns dictionary-encoded. About 3.5 bytes per
    sample per epoch for a one-part loss, against 12 raw and ~20 as CSV."""
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    encodings = {contract.SAMPLE_ID: "DELTA_BINARY_PACKED", **{name: "BYTE_STREAM_SPLIT" for name in floats}}
    others = [name for name in table.column_names if name not in encodings]
    with pa.OSFile(str(path), "wb") as sink:  # a plain local file: skips pyarrow's filesystem lookup (~0.5 ms)
        pq.write_table(table, sink, compression="zstd", use_dictionary=others, column_encoding=encodings)


class LossRecorder:
    """Collects one split's unreduced per-sample losses over an epoch, then writes one table.

    Batches stay on their device until ``end_epoch``: ``update`` only keeps references,
    so recording never forces a device-to-host copy per batch. ``end_epoch`` copies the
    epoch to the host once, checks it, and hands host arrays to the tracker's writer.
    """

    def __init__(
        self,
        split: str,
        num_samples: int,
        tracker: RunWriter | None = None,
        local_dir: str | Path | None = None,
        sample_ids: np.ndarray | None = None,
    ) -> None:
        """`sample_ids`: the ids every epoch must hold, all in ``[0, num_samples)`` (default: all of them);
        a run trained on a selection (`-P exclude=<run>`) leaves some ids out and keeps the others' meaning."""
        if num_samples <= 0:
            raise ActionScoresError(f"num_samples must be positive, got {num_samples}")
        self.split = contract.check_name("split", split)
        self.num_samples = int(num_samples)
        self.sample_ids = None if sample_ids is None else np.unique(np.asarray(sample_ids, dtype=np.int64))
        self.tracker = tracker
        self._local_dir = Path(local_dir) if local_dir is not None else None
        self._parts: list[str] | None = None
        self._last_epoch: int | None = None  # the epoch the last successful `end_epoch` ended
        self._pending_media: MediaSummary | None = None  # recorded, handed to the run after the first table
        self._gather_to_rank_0 = False  # under torch.distributed: gather even where parts could be written (bench)
        self.reset()

    @property
    def local_dir(self) -> Path:
        """Where tables are written before upload: unless given, the run's spool folder
        (`RunWriter.spool_dir`), or without a tracker a temporary folder, removed with the recorder."""
        if self._local_dir is None:
            self._local_dir = (self.tracker.spool_dir if self.tracker is not None
                               else remove_with(self, temporary_folder()))
        return self._local_dir

    def reset(self) -> None:
        """Forget the batches of the current epoch."""
        self._ids: list[torch.Tensor] = []
        self._columns: dict[str, list[torch.Tensor]] = {}
        self._pending_classification: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_values = 0
        self._unchecked_targets: list[torch.Tensor] = []  # classification targets on a device, checked at end_epoch
        self._num_classes: int | None = None  # of this epoch's logits

    def update(self, sample_ids: torch.Tensor | np.ndarray, losses: Losses, **columns: torch.Tensor) -> None:
        """Add one batch: its sample ids and unreduced losses, plus optional per-sample columns.

        ``losses`` is a 1-D tensor (one loss per sample), or a dict of part name -> 1-D
        tensor for a loss made of parts; the recorded ``loss`` is then the sum of parts.
        Extra keyword columns (for example ``target=y``) are stored as they come.
        """
        self._reduce_pending_classification()  # batches are kept in the order they came
        ids = self._checked_ids(sample_ids)
        if isinstance(losses, Mapping):
            if not losses:
                raise ActionScoresError("losses is an empty dict: give at least one part")
            parts = sorted(losses)
            named = {contract.part_column(p): losses[p] for p in parts}
            if self._parts is not None and parts != self._parts:
                raise ActionScoresError(f"loss parts changed from {self._parts or 'one tensor'} to {parts}")
        else:
            parts = []
            named = {contract.LOSS: losses}
            if self._parts:
                raise ActionScoresError(f"expected a dict with parts {self._parts}, got one tensor")
        reserved = {contract.SAMPLE_ID, contract.LOSS} | set(named)
        for name in columns:
            if name in reserved or name.startswith(contract.PART_PREFIX):
                raise ActionScoresError(f"extra column {name!r} clashes with a loss column")
        # Check every column before keeping any, so that a refused batch leaves no trace.
        checked = {name: self._checked(name, values, ids.shape[0], is_loss=name in named)
                   for name, values in {**named, **columns}.items()}
        self._parts = parts
        self._keep(ids, checked)

    def _keep(self, ids: torch.Tensor, columns: Mapping[str, torch.Tensor]) -> None:
        """Add a checked batch: its ids and its columns, in the order they came."""
        for name, values in columns.items():
            self._columns.setdefault(name, []).append(values)
        self._ids.append(ids)

    def update_classification(self, sample_ids: torch.Tensor | np.ndarray, logits: torch.Tensor,
                              targets: torch.Tensor) -> None:
        """Add one classification batch from its logits: the unreduced cross-entropy as `loss`, the
        `target`, and the columns the training-dynamics scores read (`classification_columns`).

        One call, as the `aum` package's ``update(logits, targets, sample_ids)``; for any other
        loss use ``update``. ``logits``: (N, C) floats; ``targets``: (N,) class indices.
        The batch is only checked and kept here; its columns are computed with the others'
        (at ``end_epoch``, or past `PENDING_LOGITS_LIMIT` values). Targets on the host are
        range-checked here; on an accelerator once, at ``end_epoch``, so that nothing waits for
        the device before then.
        """
        ids = self._checked_ids(sample_ids)
        logits = torch.as_tensor(logits).detach()
        targets = torch.as_tensor(targets).detach()
        if logits.dim() != 2 or not logits.dtype.is_floating_point:
            raise ActionScoresError(
                f"logits have shape {tuple(logits.shape)} and dtype {logits.dtype}; expected (N, C) floats, "
                "one row of class scores per sample"
            )
        if targets.dim() != 1 or targets.shape[0] != logits.shape[0] or targets.dtype.is_floating_point:
            raise ActionScoresError(
                f"targets have shape {tuple(targets.shape)} and dtype {targets.dtype}; expected "
                f"({logits.shape[0]},) class indices, one per row of logits (not one-hot or probabilities)"
            )
        if ids.shape[0] != logits.shape[0]:
            raise ActionScoresError(f"{ids.shape[0]} sample ids for {logits.shape[0]} rows of logits; "
                                    "pass one id per sample")
        if self._num_classes is not None and logits.shape[1] != self._num_classes:
            raise ActionScoresError(f"logits have {logits.shape[1]} classes; earlier batches of this epoch had "
                                    f"{self._num_classes}")
        self._num_classes = logits.shape[1]
        if targets.device.type == "cpu":  # free on the host; on a device it would wait for the batch
            self._check_targets(targets, logits.shape[1])
        else:
            self._unchecked_targets.append(targets)
        self._pending_classification.append((ids, logits, targets))
        self._pending_values += logits.numel()
        if self._pending_values >= PENDING_LOGITS_LIMIT:
            self._reduce_pending_classification()

    def _reduce_pending_classification(self) -> None:
        """The kept classification batches as one `update`: loss, target and dynamics columns."""
        if not self._pending_classification:
            return
        batches, self._pending_classification, self._pending_values = self._pending_classification, [], 0
        ids, logits, targets = (torch.cat(parts) for parts in zip(*batches))
        self._refuse_logits_after_parts()
        # Targets on a device are range-checked at end_epoch, without a sync now; clamped here so that a bad
        # one cannot trip a device-side assert in the gather before that check names it.
        in_range = targets if targets.device.type == "cpu" else targets.clamp(0, logits.shape[1] - 1)
        losses, columns = classification_outputs(logits, in_range)
        self._parts = []
        # Made here from checked logits: one float32 value per id already, no need for `update`'s checks.
        self._keep(ids, {contract.LOSS: losses, contract.TARGET: targets, **columns})

    def _refuse_logits_after_parts(self) -> None:
        """Logits give one loss per sample: refused in a split whose losses came in parts."""
        if self._parts:
            raise ActionScoresError(f"expected a dict with parts {self._parts}, got logits (one loss per sample)")

    @staticmethod
    def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
        """Class indices in ``[0, num_classes)``: one `aminmax` and one read of its two values."""
        if not targets.numel():
            return
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= num_classes:
            raise ActionScoresError(f"targets must be class indices in [0, {num_classes}), got values from "
                                    f"{low} to {high}")

    @staticmethod
    def _checked_ids(sample_ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        ids = torch.as_tensor(sample_ids).detach().reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ActionScoresError(f"sample_ids must be integers, got dtype {ids.dtype}")
        return ids

    def record_media(self, sample_ids: torch.Tensor | np.ndarray | Sequence[int], *,
                     labels: Sequence[str] | None = None,
                     images: np.ndarray | Sequence[np.ndarray] | None = None, texts: Sequence[str] | None = None,
                     uris: Sequence[str] | None = None, boxes: Sequence[np.ndarray] | None = None,
                     box_labels: Sequence[Sequence[str]] | None = None,
                     max_bytes: int = DEFAULT_MAX_BYTES) -> MediaSummary:
        """`tracking.record.media.record_media` for this recorder's split, into its local folder.

        Ids must lie in ``[0, num_samples)``. The table is checked, encoded and written now, and handed to
        the run once the split's first table has passed its checks (at once if one has), so that a loop
        failing at its first epoch leaves no media in the run without tables. Under torchrun only rank 0
        records (the other ranks get a summary of nothing): give it the media of the whole split.
        """
        if not distributed.is_main():
            return MediaSummary(self.split, "none", 0, 0, reason=f"rank {distributed.rank()} records no media")
        ids, _, _ = checked_sample_ids(sample_ids, f"split {self.split!r}: media", self.num_samples)
        summary = record_media(None, self.split, ids, labels=labels, images=images, texts=texts, uris=uris,
                               boxes=boxes, box_labels=box_labels, max_bytes=max_bytes, local_dir=self.local_dir)
        self._pending_media = summary
        self._hand_over_media()
        return summary

    def _hand_over_media(self) -> None:
        """Upload the recorded media once a table of the split has passed its checks."""
        media, tracker = self._pending_media, self.tracker
        if media is None or tracker is None or self._last_epoch is None:
            return
        self._pending_media = None
        if media.path is not None:
            tracker.log_artifact(media.path, contract.media_dir(self.split))

    @staticmethod
    def _checked(name: str, values: torch.Tensor, size: int, is_loss: bool) -> torch.Tensor:
        """A detached 1-D column of `size` values; losses (and half floats numpy cannot take) as float32."""
        values = torch.as_tensor(values).detach()
        if values.dim() == 0:
            raise ActionScoresError(
                f"{name!r} is a scalar: the recorder needs unreduced losses, one per sample (use reduction='none')"
            )
        if values.dim() != 1 or values.shape[0] != size:
            raise ActionScoresError(
                f"{name!r} has shape {tuple(values.shape)}; expected ({size},), one value per sample id"
            )
        if is_loss or values.dtype in (torch.bfloat16, torch.float16):
            values = values.float()  # on the device: still no host copy
        return values

    def _check_can_end(self, epoch: int) -> None:
        """Raise if `epoch` cannot be ended now: no batch since the last one, or not the next epoch."""
        contract.epoch_file_name(epoch)  # a number >= 0
        last = self._last_epoch
        if not self._ids and not self._pending_classification:
            if last is not None:
                raise ActionScoresError(
                    f"split {self.split!r}: epoch {last} was already ended and no batch was recorded since; "
                    f"record the next epoch's batches, then call end_epoch({last + 1})"
                )
            raise ActionScoresError(f"split {self.split!r}: no batch was recorded this epoch; "
                                    "call update() with the epoch's batches before end_epoch()")
        if last is not None and epoch != last + 1:
            raise ActionScoresError(
                f"split {self.split!r}: end_epoch({epoch}) after epoch {last}; expected end_epoch({last + 1}): "
                "a recorder ends each epoch once, in order (a resumed process makes a new recorder, "
                "whose first end_epoch may be any epoch)"
            )

    def _local_share(self) -> distributed.Share:
        """This process's ids and columns of the epoch, copied to the host in one go (after the one range check
        of targets on a device)."""
        if self._unchecked_targets:
            self._check_targets(torch.cat(self._unchecked_targets), self._num_classes or 0)
        self._reduce_pending_classification()
        ids = torch.cat(self._ids).cpu().numpy().astype(np.int64)
        return ids, {name: torch.cat(chunks).cpu().numpy() for name, chunks in self._columns.items()}

    def _merged(self, shares: list[distributed.Share]) -> distributed.Share:
        """The ranks' shares end to end, in rank order; all must carry the same columns."""
        names = list(shares[0][1])  # in the order recorded: the table's column order
        for position, (_, columns) in enumerate(shares):
            if sorted(columns) != sorted(names):
                raise ActionScoresError(
                    f"split {self.split!r}: rank {position} recorded columns {sorted(columns)}, rank 0 {sorted(names)}"
                )
        ids = np.concatenate([share_ids for share_ids, _ in shares])
        return ids, {name: np.concatenate([columns[name] for _, columns in shares]) for name in names}

    def _table_arrays(self, shares: list[distributed.Share], epoch: int) -> dict[str, np.ndarray]:
        """The epoch's columns, one row per sample sorted by ``sample_id``; raises if an id is out of range or
        missing (or, for a selection, not among its ids)."""
        ids, values = self._merged(shares)
        _, unique_ids, first = checked_sample_ids(ids, f"split {self.split!r}, epoch {epoch}", self.num_samples,
                                                  complete=True, expected=self.sample_ids)
        return self._sorted_columns(unique_ids, {name: column[first] for name, column in values.items()})

    def _part_arrays(self, share: distributed.Share, epoch: int) -> dict[str, np.ndarray]:
        """This rank's part of the epoch: its first occurrence of each id, sorted by ``sample_id``; raises if an
        id is out of range or, for a selection, not among its ids. Completeness is the ranks' joint question
        (`_refuse_missing`)."""
        ids, values = share
        what = f"split {self.split!r}, epoch {epoch}"
        _, unique_ids, first = checked_sample_ids(ids, what, self.num_samples)
        if self.sample_ids is not None and (unexpected := np.setdiff1d(unique_ids, self.sample_ids)).size:
            raise ActionScoresError(f"{what}: sample ids not among the split's {self.sample_ids.size} ids: "
                                    f"{preview(unexpected)}")
        return self._sorted_columns(unique_ids, {name: column[first] for name, column in values.items()})

    def _sorted_columns(self, unique_ids: np.ndarray, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The table's columns: `sample_id`, `loss` (the sum of the parts, for a loss in parts), the rest as
        recorded; losses as float32."""
        arrays: dict[str, np.ndarray] = {contract.SAMPLE_ID: unique_ids}
        loss_names = [contract.part_column(p) for p in self._parts or []]
        if loss_names:
            arrays[contract.LOSS] = np.sum([values[n].astype(np.float64) for n in loss_names], axis=0)
        for name, column in values.items():
            arrays[name] = column
        for name in [contract.LOSS, *loss_names]:
            arrays[name] = arrays[name].astype(np.float32)
        return arrays

    def _refuse_missing(self, unique_ids: np.ndarray, epoch: int, what: str) -> None:
        """Raise, on every rank alike, if a sample of the epoch is on no rank (`distributed.all_seen`)."""
        seen = distributed.all_seen(unique_ids, self.num_samples)
        expected = self.sample_ids
        missing = np.flatnonzero(seen == 0) if expected is None else expected[seen[expected] == 0]
        if missing.size:
            size = self.num_samples if expected is None else expected.size
            raise ActionScoresError(f"{what} failed on every rank: split {self.split!r}, epoch {epoch}: "
                                    f"{missing.size} of {size} samples missing: {preview(missing)}")

    def _writes_parts(self, votes: list[tuple[bool, bool, list[str]]]) -> bool:
        """Whether this epoch is written as parts, one per rank: under torch.distributed, where every rank has a
        writer that lets several processes write the run (MLflow), or none has one; else the shares are gathered
        to rank 0 (a W&B run, one process's folder; a tracker on rank 0 only)."""
        if not distributed.active() or self._gather_to_rank_0:
            return False
        capable = [can for can, _, _ in votes]
        trackers = [has for _, has, _ in votes]
        return all(capable) and (all(trackers) or not any(trackers))

    def end_epoch(self, epoch: int) -> Path | None:
        """Check the epoch's table and hand it to the tracker, which writes and uploads it in the
        background (`RunWriter.log_table`); start a new epoch.

        Here, in the caller: the one host copy of the epoch and every check (the epoch's number, its ids,
        targets on a device); the writer gets host arrays only. A refused epoch keeps its batches (add the
        missing ones and end it again). Returns the local parquet file: written when this returns without a
        tracker (kept while the recorder lives), and by the tracker's writer thread with one, which deletes it once
        the tracker has it unless the tracker keeps local copies (`keep_local`). The file is replaced
        atomically, so a re-recorded epoch (resumed training) never uploads half a table.

        Under torchrun every rank calls this, and a mistake on any rank raises the same error on every rank.
        With an MLflow writer on every rank (`distributed.share_run`), or no tracker on any, each rank writes
        its own part, `<split>/epoch_EEEE/part-<rank>.parquet`, and returns it: collectives of a few bytes
        (`distributed.agree`) and one all-reduce of a byte per sample (`distributed.all_seen`: 10 MB per
        epoch at 10M samples), so that rank 0 costs what any rank costs. Otherwise (W&B, whose run is one
        process's folder) the shares are gathered to rank 0, which writes the whole table; the others get None.
        """
        what = f"end_epoch({epoch}) of split {self.split!r}"
        share, error = None, None
        try:
            self._check_can_end(epoch)
            share = self._local_share()
        except Exception as local_error:  # every rank learns it, before the next collective would wait for this one
            error = local_error
        vote = (self.tracker is None or self.tracker.several_writers, self.tracker is not None,
                [] if share is None else list(share[1]))
        votes = distributed.agree_and_exchange(error, what, vote)
        if self._writes_parts(votes):
            return self._end_epoch_in_parts(epoch, share, votes, what)  # type: ignore[arg-type]
        shares = distributed.gather_shares(share)
        arrays = None
        try:
            arrays = None if shares is None else self._table_arrays(shares, epoch)
        except Exception as merge_error:
            error = merge_error
        distributed.agree(error, what)
        self._epoch_ended(epoch)
        if arrays is None:
            return None
        return self._hand_over(arrays, contract.losses_dir(self.split), contract.epoch_file_name(epoch))

    def _end_epoch_in_parts(self, epoch: int, share: distributed.Share, votes: list[tuple[bool, bool, list[str]]],
                            what: str) -> Path:
        """This rank's part of `epoch`, checked here and against the other ranks' (the same columns as rank 0's,
        every sample on some rank), then handed to this rank's writer."""
        arrays, error = None, None
        try:
            names = votes[0][2]
            if sorted(votes[distributed.rank()][2]) != sorted(names):
                raise ActionScoresError(f"split {self.split!r}: rank {distributed.rank()} recorded columns "
                                        f"{sorted(votes[distributed.rank()][2])}, rank 0 {sorted(names)}")
            arrays = self._part_arrays(share, epoch)
        except Exception as part_error:
            error = part_error
        distributed.agree(error, what)
        assert arrays is not None
        self._refuse_missing(arrays[contract.SAMPLE_ID], epoch, what)
        self._epoch_ended(epoch)
        return self._hand_over(arrays, contract.epoch_parts_dir(self.split, epoch),
                               contract.part_file_name(distributed.rank()))

    def _epoch_ended(self, epoch: int) -> None:
        self.reset()
        self._last_epoch = epoch

    def _hand_over(self, arrays: dict[str, np.ndarray], folder: str, name: str) -> Path:
        """Write the table `folder/name` now (no tracker) or on the tracker's writer thread, then its media."""
        path = self.local_dir / folder / name
        write = functools.partial(_write_arrays, arrays, path)
        if self.tracker is None:
            write()
        else:
            self.tracker.log_table(path, write, folder)
        self._hand_over_media()
        return path


def _write_arrays(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    """The table of `arrays` written atomically to `path` (on the tracker's writer thread when there is one)."""
    write_atomically(path, functools.partial(write_table, pa.table(dict(arrays))))
