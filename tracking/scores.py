"""Action scores over per-epoch tables, computed one epoch at a time.

Action score (Arriaga & Valdenegro-Toro, "Unsupervised Difficulty Estimation with Action
Scores"): A(x) = sum_n L(y, m(x; theta_n)), the sample's loss summed over epochs.
Higher = harder or mislabeled; lowest = easy, often a dataset bias. For a loss made of
parts, each part gets its own action (`action_loc` = sum of `loss_loc`).

The sums run table by table, so memory grows with the number of samples, never with
samples x epochs (1M samples x 100 epochs: one float64 per sample and part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.rank import rank_desc


def read_epoch_table(path: str | Path, name: str) -> pa.Table:
    """Read and check one `epoch_EEEE.parquet`; `name` is how errors refer to it.

    Checks: readable parquet, a non-empty table, an integer `sample_id` without
    duplicates, float `loss` and `loss_<part>` columns. Returns it sorted by sample_id.
    """
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise ActionScoresError(f"{name} is not a readable parquet file: {error}") from None
    columns = table.column_names
    for required in (contract.SAMPLE_ID, contract.LOSS):
        if required not in columns:
            raise ActionScoresError(f"{name} has no {required!r} column (columns: {columns})")
    if table.num_rows == 0:
        raise ActionScoresError(f"{name} is empty")
    if table.column(contract.SAMPLE_ID).null_count:
        raise ActionScoresError(f"{name}: column 'sample_id' has {table.column(contract.SAMPLE_ID).null_count} nulls")
    if not pa.types.is_integer(table.schema.field(contract.SAMPLE_ID).type):
        raise ActionScoresError(
            f"{name}: column 'sample_id' must be integer, got {table.schema.field(contract.SAMPLE_ID).type}"
        )
    try:
        loss_columns = [contract.LOSS] + [contract.part_column(p) for p in contract.parts_of(columns)]
    except ActionScoresError as error:
        raise ActionScoresError(f"{name}: {error}") from None
    for column in loss_columns:
        if not pa.types.is_floating(table.schema.field(column).type):
            raise ActionScoresError(
                f"{name}: column {column!r} must be float, got {table.schema.field(column).type}"
            )
    ids = table.column(contract.SAMPLE_ID).to_numpy()
    if not np.all(ids[1:] > ids[:-1]):
        table = table.sort_by(contract.SAMPLE_ID)
        ids = table.column(contract.SAMPLE_ID).to_numpy()
        repeated = np.unique(ids[1:][ids[1:] == ids[:-1]])
        if repeated.size:
            raise ActionScoresError(f"{name}: repeated sample ids {preview(repeated)}")
    return table


@dataclass
class ActionAccumulator:
    """Running action of one split: feed epoch tables in order with `update`, then `compute`.

    The first table fixes the set of sample ids; every later epoch must have the same
    set and the same loss parts. NaN or infinite losses are never summed: they are
    collected and reported by `compute`, naming the samples and epochs.
    """

    split: str
    sample_ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    epochs: int = 0
    non_finite: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def update(self, epoch: int, table: pa.Table, name: str) -> None:
        """Add the (checked, sorted) table of `epoch`, which must be the next epoch."""
        if epoch != self.epochs:
            raise ActionScoresError(f"{name}: expected epoch {self.epochs}, got {epoch}")
        ids = table.column(contract.SAMPLE_ID).to_numpy().astype(np.int64, copy=False)
        loss_columns = [contract.LOSS] + [contract.part_column(p) for p in contract.parts_of(table.column_names)]
        if self.sample_ids is None:
            self.sample_ids = ids
            self.sums = {column: np.zeros(ids.size, dtype=np.float64) for column in loss_columns}
            if contract.TARGET in table.column_names:
                self.labels = table.column(contract.TARGET).to_numpy(zero_copy_only=False)
        else:
            _check_same_ids(self.split, self.sample_ids, ids, name)
            if sorted(loss_columns) != sorted(self.sums):
                raise ActionScoresError(
                    f"{name}: loss columns {sorted(loss_columns)} differ from epoch 0's {sorted(self.sums)}"
                )
        for column in loss_columns:
            values = table.column(column).to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(values)
            if bad.any():
                self.non_finite.append((epoch, ids[bad]))
                values = np.where(bad, 0.0, values)
            self.sums[column] += values
        self.epochs += 1

    def compute(self) -> pd.DataFrame:
        """The scores table of the contract: sample_id, epochs, action, action_<part>, mean_loss, rank, label."""
        if self.sample_ids is None:
            raise ActionScoresError(f"split {self.split!r}: no epoch tables to score")
        if self.non_finite:
            details = "; ".join(f"epoch {epoch}: samples {preview(ids)}" for epoch, ids in self.non_finite[:5])
            more = f"; and {len(self.non_finite) - 5} more epochs" if len(self.non_finite) > 5 else ""
            raise ActionScoresError(
                f"split {self.split!r} has NaN or infinite losses, which would corrupt the sums: "
                f"{details}{more}"
            )
        scores = pd.DataFrame({contract.SAMPLE_ID: self.sample_ids})
        scores["epochs"] = np.int64(self.epochs)
        for column, total in self.sums.items():
            scores["action" + column[len(contract.LOSS):]] = total
        scores["mean_loss"] = scores["action"] / self.epochs
        scores["rank"] = rank_desc(scores, "action")
        if self.labels is not None:
            scores["label"] = self.labels
        return scores


def _check_same_ids(split: str, reference: np.ndarray, ids: np.ndarray, name: str) -> None:
    """Refuse an epoch whose (sorted) ids are not exactly epoch 0's."""
    if ids.size == reference.size and np.array_equal(ids, reference):
        return
    raise ActionScoresError(
        f"{name}: sample ids differ from epoch 0 of split {split!r}: "
        f"missing {preview(np.setdiff1d(reference, ids))}, unexpected {preview(np.setdiff1d(ids, reference))}"
    )
