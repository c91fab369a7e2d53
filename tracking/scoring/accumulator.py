"""The streaming scorer of one split: epoch tables in, the scores table of the contract out.

`ActionAccumulator` holds the per-sample state of every registered score
(`tracking.scoring.registry`) whose recorded columns the split's tables have, and folds the
tables in one epoch at a time; the maths of each score lives in its registry entry. A score
whose column a run lacks is left out, and `ActionAccumulator.missing` says why.

The sums run table by table, so memory grows with the number of samples, never with
samples x epochs (1M samples x 100 epochs: a few float64 per sample and score).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.scoring import regions
from tracking.scoring.rank import rank
from tracking.scoring.registry import BLOCK, SCORES, SCRATCH, Score, State
from tracking.scoring.tables import bools, dynamics_expected, recorded_columns

# Recorded columns read only by scores that take one epoch (el2n): the other epochs need not decode them.
_ONE_EPOCH_COLUMNS = frozenset(
    {c for s in SCORES.values() if s.at_one_epoch for c in s.columns}
    - {c for s in SCORES.values() if not s.at_one_epoch for c in s.columns}
)
_ONE_EPOCH_SCORES = "/".join(s.name for s in SCORES.values() if s.at_one_epoch)


@dataclass
class _Active:
    """A registered score this split computes: its output column, the table column behind each
    of the score's inputs (`loss` -> `loss_loc` for `action_loc`), its state and that state's block views."""

    column: str
    score: Score
    inputs: dict[str, str]
    state: State
    blocks: list[State]  # empty for a score that reduces another's state (`Score.shares`): no update of its own


def _activate(score: Score, column: str, inputs: dict[str, str], size: int) -> _Active:
    state = score.init(size)
    blocks = [{name: values[:min(BLOCK, size - start)] if name.startswith(SCRATCH) else values[start:start + BLOCK]
               for name, values in state.items()} for start in range(0, size, BLOCK)]
    return _Active(column, score, inputs, state, blocks)


@dataclass
class ActionAccumulator:
    """Running scores of one split: feed epoch tables in order with `update`, then `compute`.

    The first table fixes the set of sample ids, the loss parts and the recorded columns
    (so the scores computed); every later epoch must have the same. NaN or infinite values
    are never summed: they are collected and reported by `compute`, naming the samples and
    epochs. `el2n_epoch`: the zero-based epoch whose table the one-epoch scores (el2n) read.
    """

    split: str
    el2n_epoch: int = 0
    sample_ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    loss_columns: list[str] = field(default_factory=list)
    sources: frozenset[str] = frozenset()  # recorded columns (contract.RECORDED_COLUMNS) of epoch 0
    active: list[_Active] = field(default_factory=list)
    epochs: int = 0
    non_finite: list[tuple[int, np.ndarray]] = field(default_factory=list)
    non_finite_columns: set[str] = field(default_factory=set)
    missing: dict[str, str] = field(default_factory=dict)  # score left out -> why
    dynamics_expected: bool = True  # whether `missing` is worth a warning (`tables.dynamics_expected`)

    def unused_columns(self, epoch: int) -> frozenset[str]:
        """Columns of epoch `epoch`'s table that no score reads, so a reader need not decode them:
        `target` after epoch 0 (labels come from epoch 0), one-epoch scores' columns (`el2n`) off
        their epoch after epoch 0."""
        if epoch == 0:
            return frozenset()
        return frozenset({contract.TARGET} | (_ONE_EPOCH_COLUMNS if epoch != self.el2n_epoch else frozenset()))

    def update(self, epoch: int, table: pa.Table, name: str) -> None:
        """Add the (checked, sorted) table of `epoch`, which must be the next epoch.

        The table may lack its `unused_columns`; every other column must match epoch 0's.
        """
        if epoch != self.epochs:
            raise ActionScoresError(f"{name}: expected epoch {self.epochs}, got {epoch}")
        ids = table.column(contract.SAMPLE_ID).to_numpy().astype(np.int64, copy=False)
        loss_columns = contract.loss_columns(table.column_names)
        sources = recorded_columns(table.schema, name)
        if self.sample_ids is None:
            self._start(ids, loss_columns, sources, table)
        else:
            _check_same_ids(self.split, self.sample_ids, ids, name)
            if sorted(loss_columns) != sorted(self.loss_columns):
                raise ActionScoresError(
                    f"{name}: loss columns {sorted(loss_columns)} differ from epoch 0's {sorted(self.loss_columns)}"
                )
            unused = self.unused_columns(epoch)
            if sources - unused != self.sources - unused:
                raise ActionScoresError(
                    f"{name}: per-sample columns {sorted(sources)} differ from epoch 0's {sorted(self.sources)}"
                )
        present = self.sources & sources
        columns: dict[str, np.ndarray] = {}
        floats = [c for c in contract.RECORDED_COLUMNS if c in present and c != contract.CORRECT]
        for column in loss_columns + floats:
            values = table.column(column).to_numpy(zero_copy_only=False)
            if not np.isfinite(values).all():
                bad = ~np.isfinite(values)
                self.non_finite.append((epoch, ids[bad]))
                self.non_finite_columns.add(column)
                values = np.where(bad, 0.0, values)  # `compute` refuses the split; until then no NaN spreads
            columns[column] = values
        if contract.CORRECT in present:
            columns[contract.CORRECT] = bools(table.column(contract.CORRECT), f"{name}: column 'correct'")
        self._fold(epoch, columns)
        self.epochs += 1

    def _start(self, ids: np.ndarray, loss_columns: list[str], sources: frozenset[str], table: pa.Table) -> None:
        """Epoch 0 fixes the ids, the labels, and which scores this split computes."""
        self.sample_ids, self.loss_columns, self.sources = ids, loss_columns, sources
        self.dynamics_expected = dynamics_expected(table.column_names)
        if contract.TARGET in table.column_names:
            self.labels = table.column(contract.TARGET).to_numpy(zero_copy_only=False)
        available = set(loss_columns) | sources
        for score in SCORES.values():
            lacking = [column for column in score.columns if column not in available]
            if lacking:
                self.missing[score.name] = (f"the tables have no {lacking[0]!r} column "
                                            "(recorded by tracking.record.classification_columns)")
            elif score.per_loss_part:  # the score of `loss`, and of each `loss_<part>` in its place
                self.active += [_activate(score, score.name + loss[len(contract.LOSS):],
                                          {contract.LOSS: loss, **{c: c for c in score.columns if c != contract.LOSS}},
                                          ids.size) for loss in loss_columns]
            elif score.shares:  # reduces the state of `score.shares`, filled in below
                self.active.append(_Active(score.name, score, {}, {}, []))
            else:
                self.active.append(_activate(score, score.name, {c: c for c in score.columns}, ids.size))
        by_column = {active.column: active for active in self.active}
        for active in self.active:
            if active.score.shares:
                active.state = by_column[active.score.shares].state

    def _fold(self, epoch: int, columns: dict[str, np.ndarray]) -> None:
        """Every active score's update, block by block: the state a block touches stays in the
        CPU cache through all the scores' steps (2x faster than whole-array steps at 1M samples)."""
        due = [a for a in self.active if a.blocks and (not a.score.at_one_epoch or epoch == self.el2n_epoch)]
        for index, start in enumerate(range(0, self.sample_ids.size, BLOCK)):
            block = {column: values[start:start + BLOCK] for column, values in columns.items()}
            for active in due:
                active.score.update(active.blocks[index], {own: block[source] for own, source in active.inputs.items()},
                                    epoch)

    def compute(self) -> pd.DataFrame:
        """The scores table of the contract: sample_id, epochs, the registered scores the tables
        allow (action, action_<part>, mean_loss, ...), rank (by action), label, and Cartography's
        `region` where there are confidence and variability (`tracking.scoring.regions`)."""
        if self.sample_ids is None:
            raise ActionScoresError(f"split {self.split!r}: no epoch tables to score")
        if self.non_finite:
            details = "; ".join(f"epoch {epoch}: samples {preview(ids)}" for epoch, ids in self.non_finite[:5])
            more = f"; and {len(self.non_finite) - 5} more epochs" if len(self.non_finite) > 5 else ""
            recorded = sorted(self.non_finite_columns - set(self.loss_columns))
            what = (f"values in {recorded + sorted(self.non_finite_columns & set(self.loss_columns))}" if recorded
                    else "losses")
            raise ActionScoresError(
                f"split {self.split!r} has NaN or infinite {what}, which would corrupt the sums: {details}{more}"
            )
        one_epoch = any(a.score.at_one_epoch for a in self.active)
        if self.el2n_epoch < 0 or (one_epoch and self.el2n_epoch >= self.epochs):
            raise ActionScoresError(f"split {self.split!r}: {_ONE_EPOCH_SCORES} epoch {self.el2n_epoch} is not "
                                    f"one of the run's epochs 0..{self.epochs - 1}")
        columns: dict[str, np.ndarray] = {
            contract.SAMPLE_ID: self.sample_ids, "epochs": np.full(self.sample_ids.size, self.epochs, dtype=np.int64),
        }
        for active in self.active:
            columns[active.column] = active.score.reduce(active.state, self.epochs)
        columns["rank"] = rank(pd.DataFrame({c: columns[c] for c in (contract.SAMPLE_ID, "action")}, copy=False),
                               "action")
        if self.labels is not None:
            columns["label"] = self.labels
        if all(name in columns for name in regions.NEEDS):
            columns[regions.REGION] = regions.assign(columns["confidence"], columns["variability"])
        return pd.DataFrame(columns, copy=False)  # the arrays are this accumulator's own: no copy needed


def _check_same_ids(split: str, reference: np.ndarray, ids: np.ndarray, name: str) -> None:
    """Refuse an epoch whose (sorted) ids are not exactly epoch 0's."""
    if ids.size == reference.size and np.array_equal(ids, reference):
        return
    raise ActionScoresError(
        f"{name}: sample ids differ from epoch 0 of split {split!r}: "
        f"missing {preview(np.setdiff1d(reference, ids))}, unexpected {preview(np.setdiff1d(ids, reference))}"
    )
