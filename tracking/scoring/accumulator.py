"""Action scores over per-epoch tables, computed one epoch at a time.

Action score (Arriaga & Valdenegro-Toro, "Unsupervised Difficulty Estimation with Action
Scores"): A(x) = sum_n L(y, m(x; theta_n)), the sample's loss summed over epochs.
Higher = harder or mislabeled; lowest = easy, often a dataset bias. For a loss made of
parts, each part gets its own action (`action_loc` = sum of `loss_loc`).

The same pass computes the rest of the training-dynamics family from the per-sample
columns a classification step records beside `loss` (`classification_columns`):
Dataset Cartography's `confidence`, `variability`, `correctness` (Swayamdipta et al. 2020),
`forgetting` events (Toneva et al. 2019), `aum`, the area under the margin (Pleiss et al.
2020) and `el2n` at one early epoch (Paul et al. 2021). A score whose column a run lacks
is left out, and `ActionAccumulator.missing` says why.

The sums run table by table, so memory grows with the number of samples, never with
samples x epochs (1M samples x 100 epochs: a few float64 per sample and part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.scoring.rank import rank_desc
from tracking.scoring.tables import bools, recorded_columns

# Score column -> the recorded column it needs.
DYNAMICS_SOURCES = {
    "confidence": contract.P_TRUE,
    "variability": contract.P_TRUE,
    "correctness": contract.CORRECT,
    "forgetting": contract.CORRECT,
    "aum": contract.MARGIN,
    "el2n": contract.EL2N,
}
_FLOAT_SOURCES = (contract.P_TRUE, contract.MARGIN, contract.EL2N)
_BLOCK = 1 << 15  # samples per step of the dynamics update: its arrays fit in a CPU's L2 cache


@dataclass
class ActionAccumulator:
    """Running action of one split: feed epoch tables in order with `update`, then `compute`.

    The first table fixes the set of sample ids; every later epoch must have the same
    set and the same loss parts. NaN or infinite losses are never summed: they are
    collected and reported by `compute`, naming the samples and epochs.
    """

    split: str
    el2n_epoch: int = 0
    sample_ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    epochs: int = 0
    non_finite: list[tuple[int, np.ndarray]] = field(default_factory=list)
    non_finite_columns: set[str] = field(default_factory=set)
    dynamics: _Dynamics | None = None
    missing: dict[str, str] = field(default_factory=dict)  # score left out -> why

    def unused_columns(self, epoch: int) -> frozenset[str]:
        """Columns of epoch `epoch`'s table that no score reads, so a reader need not decode them:
        `target` after epoch 0 (labels come from epoch 0), `el2n` off its epoch after epoch 0."""
        if epoch == 0:
            return frozenset()
        return frozenset({contract.TARGET} | ({contract.EL2N} if epoch != self.el2n_epoch else set()))

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
            self.sample_ids = ids
            self.sums = {column: np.zeros(ids.size, dtype=np.float64) for column in loss_columns}
            if contract.TARGET in table.column_names:
                self.labels = table.column(contract.TARGET).to_numpy(zero_copy_only=False)
            self.dynamics = _Dynamics(ids.size, sources)
        else:
            _check_same_ids(self.split, self.sample_ids, ids, name)
            if sorted(loss_columns) != sorted(self.sums):
                raise ActionScoresError(
                    f"{name}: loss columns {sorted(loss_columns)} differ from epoch 0's {sorted(self.sums)}"
                )
            unused = self.unused_columns(epoch)
            if sources - unused != self.dynamics.sources - unused:
                raise ActionScoresError(
                    f"{name}: per-sample columns {sorted(sources)} differ from epoch 0's {sorted(self.dynamics.sources)}"
                )
        columns: dict[str, np.ndarray] = {}
        for column in loss_columns + [c for c in _FLOAT_SOURCES if c in self.dynamics.sources & sources]:
            values = table.column(column).to_numpy(zero_copy_only=False)
            if not np.isfinite(values).all():
                bad = ~np.isfinite(values)
                self.non_finite.append((epoch, ids[bad]))
                self.non_finite_columns.add(column)
                values = np.where(bad, 0.0, values)  # `compute` refuses the split; until then no NaN spreads
            columns[column] = values
            if column in self.sums:
                self.sums[column] += values
        if contract.CORRECT in self.dynamics.sources:
            columns[contract.CORRECT] = bools(table.column(contract.CORRECT), f"{name}: column 'correct'")
        self.dynamics.update(columns, epoch == self.el2n_epoch)
        self.epochs += 1

    def compute(self) -> pd.DataFrame:
        """The scores table of the contract: sample_id, epochs, action, action_<part>, mean_loss, rank, label."""
        if self.sample_ids is None:
            raise ActionScoresError(f"split {self.split!r}: no epoch tables to score")
        if self.non_finite:
            details = "; ".join(f"epoch {epoch}: samples {preview(ids)}" for epoch, ids in self.non_finite[:5])
            more = f"; and {len(self.non_finite) - 5} more epochs" if len(self.non_finite) > 5 else ""
            dynamics = sorted(self.non_finite_columns & set(_FLOAT_SOURCES))
            what = f"values in {dynamics + sorted(self.non_finite_columns & set(self.sums))}" if dynamics else "losses"
            raise ActionScoresError(
                f"split {self.split!r} has NaN or infinite {what}, which would corrupt the sums: {details}{more}"
            )
        if self.el2n_epoch < 0 or (contract.EL2N in self.dynamics.sources and self.el2n_epoch >= self.epochs):
            raise ActionScoresError(
                f"split {self.split!r}: el2n epoch {self.el2n_epoch} is not one of the run's epochs 0..{self.epochs - 1}"
            )
        columns: dict[str, np.ndarray] = {
            contract.SAMPLE_ID: self.sample_ids, "epochs": np.full(self.sample_ids.size, self.epochs, dtype=np.int64),
        }
        for column, total in self.sums.items():
            columns[contract.action_column(column)] = total
        columns["mean_loss"] = self.sums[contract.LOSS] / self.epochs
        columns |= self.dynamics.compute()
        self.missing = {
            score: f"the tables have no {source!r} column (recorded by tracking.record.classification_columns)"
            for score, source in DYNAMICS_SOURCES.items() if source not in self.dynamics.sources
        }
        columns["rank"] = rank_desc(pd.DataFrame({c: columns[c] for c in (contract.SAMPLE_ID, "action")}, copy=False), "action")
        if self.labels is not None:
            columns["label"] = self.labels
        return pd.DataFrame(columns, copy=False)  # the arrays are this accumulator's own: no copy needed


@dataclass
class _Dynamics:
    """Running per-sample state of the dynamics scores, one epoch table at a time.

    Variability uses Welford's update of mean and squared deviations (no catastrophic
    cancellation), giving the population standard deviation (ddof=0) as Cartography's
    `np.std` does.
    """

    size: int
    sources: frozenset[str]
    epochs: int = 0
    p_mean: np.ndarray | None = None
    p_m2: np.ndarray | None = None
    right: np.ndarray | None = None
    previous: np.ndarray | None = None
    ever_right: np.ndarray | None = None
    forgotten: np.ndarray | None = None
    margin_sum: np.ndarray | None = None
    el2n: np.ndarray | None = None
    delta: np.ndarray | None = None  # Welford's scratch buffers
    scratch: np.ndarray | None = None

    def __post_init__(self) -> None:
        zeros = lambda dtype: np.zeros(self.size, dtype=dtype)  # noqa: E731
        if contract.P_TRUE in self.sources:
            self.p_mean, self.p_m2 = zeros(np.float64), zeros(np.float64)
            self.delta, self.scratch = np.empty(min(self.size, _BLOCK)), np.empty(min(self.size, _BLOCK))
        if contract.CORRECT in self.sources:
            self.right, self.forgotten = zeros(np.int32), zeros(np.int32)  # int32: 2x faster sums than int64
            self.previous, self.ever_right = zeros(bool), zeros(bool)
        if contract.MARGIN in self.sources:
            self.margin_sum = zeros(np.float64)

    def update(self, columns: dict[str, np.ndarray], take_el2n: bool) -> None:
        """Fold in one epoch's columns: finite floats and `correct`, in the split's id order.

        In place and in blocks of `_BLOCK` samples, so that the state a block touches stays in
        the CPU cache through all its steps: 2x faster than whole-array steps at 1M samples.
        """
        self.epochs += 1
        for start in range(0, self.size, _BLOCK):
            block = slice(start, start + _BLOCK)
            self._update_block(block, {column: values[block] for column, values in columns.items()})
        if take_el2n and contract.EL2N in self.sources:
            self.el2n = columns[contract.EL2N].astype(np.float64)

    def _update_block(self, block: slice, columns: dict[str, np.ndarray]) -> None:
        if self.p_mean is not None:  # Welford: delta = p - mean; mean += delta / n; m2 += delta * (p - mean)
            p, mean = columns[contract.P_TRUE], self.p_mean[block]
            delta, scratch = self.delta[:p.size], self.scratch[:p.size]
            np.subtract(p, mean, out=delta)
            np.divide(delta, self.epochs, out=scratch)
            mean += scratch
            np.subtract(p, mean, out=scratch)
            scratch *= delta
            self.p_m2[block] += scratch
        if self.right is not None:
            correct, previous = columns[contract.CORRECT], self.previous[block]
            self.forgotten[block] += previous > correct  # right last epoch, wrong now
            self.right[block] += correct
            self.ever_right[block] |= correct
            previous[:] = correct
        if self.margin_sum is not None:
            self.margin_sum[block] += columns[contract.MARGIN]

    def compute(self) -> dict[str, np.ndarray]:
        """Score columns this run's tables allow, in the contract's order."""
        out: dict[str, np.ndarray] = {}
        epochs = self.epochs
        if self.p_mean is not None:
            out["confidence"] = self.p_mean
            out["variability"] = np.sqrt(self.p_m2 / epochs)
        if self.right is not None:
            out["correctness"] = self.right / epochs
            # Never learned: `epochs`, above any learned sample's count (at most epochs // 2).
            out["forgetting"] = np.where(self.ever_right, self.forgotten, epochs).astype(np.int64)
        if self.margin_sum is not None:
            out["aum"] = self.margin_sum / epochs
        if self.el2n is not None:
            out["el2n"] = self.el2n
        return out


def _check_same_ids(split: str, reference: np.ndarray, ids: np.ndarray, name: str) -> None:
    """Refuse an epoch whose (sorted) ids are not exactly epoch 0's."""
    if ids.size == reference.size and np.array_equal(ids, reference):
        return
    raise ActionScoresError(
        f"{name}: sample ids differ from epoch 0 of split {split!r}: "
        f"missing {preview(np.setdiff1d(reference, ids))}, unexpected {preview(np.setdiff1d(ids, reference))}"
    )
