"""Scoring engines: one split's epoch tables in, the scores table of the contract out.

- `arrow` (default): one table at a time through `ActionAccumulator`, every registered
  score, memory O(samples); the next tables are decoded while one is summed.
- `duckdb`: one SQL query over all files, the loss sums only, spilling to disk when a
  run's sums outgrow memory.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from tracking.scoring.accumulator import ActionAccumulator
from tracking.scoring.tables import read_epoch_table

log = logging.getLogger(__name__)

READ_AHEAD = 2  # epoch tables decoded in parallel while the previous one is summed


def default_el2n_epoch(epochs: int) -> int:
    """Zero-based epoch whose table gives `el2n` by default: a tenth into training, as the
    paper's epoch 20 of 200 (epoch 0 for runs under 10 epochs)."""
    return epochs // 10



def score_split(split: str, tables: list[tuple[str, Path]], el2n_epoch: int | None = None) -> pd.DataFrame:
    """Scores of one split from its (artifact path, local file) pairs, in epoch order.

    `el2n_epoch` (zero-based) picks the table `el2n` comes from; None: `default_el2n_epoch`.
    Scores the tables lack columns for are left out, with a warning that says why.
    """
    chosen = default_el2n_epoch(len(tables)) if el2n_epoch is None else el2n_epoch
    accumulator = ActionAccumulator(split, el2n_epoch=chosen)
    # READ_AHEAD files are decoded at once, one thread each, while this thread sums the one before
    # (both release the GIL): on 2 cores as fast as pyarrow's own threaded read of the files alone.
    # At most READ_AHEAD + 1 tables are in memory.
    with ThreadPoolExecutor(READ_AHEAD) as readers:
        def read(epoch: int) -> Future[pa.Table]:
            name, local = tables[epoch]
            return readers.submit(read_epoch_table, local, name, threads=False, skip=accumulator.unused_columns(epoch))

        upcoming = deque(read(epoch) for epoch in range(min(READ_AHEAD, len(tables))))
        for epoch, (name, _) in enumerate(tqdm(tables, desc=f"score {split}", unit="epoch")):
            table = upcoming.popleft().result()
            if epoch + READ_AHEAD < len(tables):
                upcoming.append(read(epoch + READ_AHEAD))
            accumulator.update(epoch, table, name)
    scores = accumulator.compute()
    if accumulator.missing:
        reasons = defaultdict(list)
        for score, why in accumulator.missing.items():
            reasons[why].append(score)
        scores.attrs["missing"] = "; ".join(f"no {', '.join(names)}: {why}" for why, names in reasons.items())
        log.warning("split %r: %s", split, scores.attrs["missing"])
    return scores


def score_split_duckdb(split: str, tables: list[tuple[str, Path]], el2n_epoch: int | None = None) -> pd.DataFrame:
    """The loss sums from one DuckDB query over the split's files: for runs whose sums outgrow memory.

    Only `action`, `action_<part>` and `mean_loss`: the dynamics scores need the arrow engine.
    """
    from tracking.scoring.duckdb_engine import score_tables_duckdb

    scores = score_tables_duckdb([local for _, local in tables], split)
    scores.attrs["missing"] = "no training-dynamics scores: the duckdb engine sums losses only (use --engine arrow)"
    log.warning("split %r: %s", split, scores.attrs["missing"])
    return scores


# Scoring engines by name (`--engine`): both give the scores table of the contract.
ENGINES: dict[str, Callable[[str, list[tuple[str, Path]], int | None], pd.DataFrame]] = {
    "arrow": score_split,
    "duckdb": score_split_duckdb,
}
