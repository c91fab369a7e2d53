"""Scoring engines: one split's epoch tables in, the scores table of the contract out.

- `arrow` (default): one table at a time through `ActionAccumulator`, every registered
  score, memory O(samples); it streams: each table is scored as soon as it is here (a file, or a
  reader that waits for a table still arriving), the next ones decoded while one is summed.
- `duckdb`: one SQL query over all files, the loss sums only, spilling to disk when a
  run's sums outgrow memory; it needs every file of the split before it starts.

Both read an epoch given as one table or as the parts of a sharded epoch (their union,
`tables.union_of_parts`), and call `done(epoch)` once an epoch's files are read, so the caller
may delete its copies.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tracking.scoring.accumulator import ActionAccumulator
from tracking.scoring.spark_engine import score_split_spark
from tracking.scoring.tables import dynamics_expected, files_of, read_epoch_table, read_part_table, union_of_parts

log = logging.getLogger(__name__)

READ_AHEAD = 2  # epoch tables decoded in parallel while the previous one is summed

PART_READERS = 4  # parts of the sharded epochs being read, decoded in parallel

TableSource = Path | pa.NativeFile  # what pyarrow reads: a file, or a reader over bytes in memory
Source = TableSource | Callable[[], TableSource]  # a table's source, or a function that waits for it and returns it
Tables = Sequence[tuple[str, Source | list[tuple[str, Source]]]]
"""(artifact path for messages, the table's source), one per epoch in epoch order; a sharded epoch's source is
the list of its parts' (artifact path, source), in part order. The job's tables still arriving
(`tracking.fetch.RunFiles.tables`), or files at hand."""


def table_source(table: Source) -> TableSource:
    """The source of one table of `Tables`, waiting for it where it is still arriving."""
    return table() if callable(table) else table


def read_epoch(name: str, source: Source | list[tuple[str, Source]], skip: frozenset[str],
               part_readers: ThreadPoolExecutor) -> pa.Table:
    """One epoch of `Tables`, checked and sorted by sample_id: a single table, or the union of its parts,
    decoded by `part_readers` as each arrives."""
    if not isinstance(source, list):
        return read_epoch_table(table_source(source), name, threads=False, skip=skip)
    reads = [part_readers.submit(lambda part=part, table=table: read_part_table(table_source(table), part,
                                                                                 threads=False, skip=skip))
             for part, table in source]
    return union_of_parts([(part, read.result()) for (part, _), read in zip(source, reads)], name)


def default_el2n_epoch(epochs: int) -> int:
    """Zero-based epoch whose table gives `el2n` by default: a tenth into training, as the
    paper's epoch 20 of 200 (epoch 0 for runs under 10 epochs)."""
    return epochs // 10



def score_split(split: str, tables: Tables, el2n_epoch: int | None = None,
                done: Callable[[int], None] | None = None, progress: bool = True) -> pd.DataFrame:
    """Scores of one split from its (artifact path, local file) pairs, in epoch order.

    A table may still be arriving (a function that waits for it): each is read as soon as it is there, in
    epoch order, and `done(epoch)` is called once it is read (its file may then go).
    `el2n_epoch` (zero-based) picks the table `el2n` comes from; None: `default_el2n_epoch`.
    Scores the tables lack columns for are left out, with a warning that says why (none for tables of a
    task the dynamics scores do not apply to, see `tables.dynamics_expected`).
    """
    chosen = default_el2n_epoch(len(tables)) if el2n_epoch is None else el2n_epoch
    accumulator = ActionAccumulator(split, el2n_epoch=chosen)

    def read(epoch: int) -> pa.Table:
        name, source = tables[epoch]
        table = read_epoch(name, source, accumulator.unused_columns(epoch), part_readers)
        if done is not None:
            done(epoch)
        return table

    # READ_AHEAD epochs are decoded at once, one thread each (their parts by PART_READERS more), while this
    # thread sums the one before (all release the GIL): on 2 cores as fast as pyarrow's own threaded read of
    # the files alone. At most READ_AHEAD + 1 epochs are in memory.
    with ThreadPoolExecutor(READ_AHEAD) as readers, ThreadPoolExecutor(PART_READERS) as part_readers:
        upcoming = deque(readers.submit(read, epoch) for epoch in range(min(READ_AHEAD, len(tables))))
        for epoch, (name, _) in enumerate(tqdm(tables, desc=f"score {split}", unit="epoch", disable=not progress)):
            table = upcoming.popleft().result()
            if epoch + READ_AHEAD < len(tables):
                upcoming.append(readers.submit(read, epoch + READ_AHEAD))
            accumulator.update(epoch, table, name)
    scores = accumulator.compute()
    if accumulator.missing and accumulator.dynamics_expected:
        reasons = defaultdict(list)
        for score, why in accumulator.missing.items():
            reasons[why].append(score)
        _missing(scores, split, "; ".join(f"no {', '.join(names)}: {why}" for why, names in reasons.items()))
    return scores


def _missing(scores: pd.DataFrame, split: str, why: str) -> None:
    """Say which scores a split lacks and why: a warning, and `scores.attrs["missing"]` for the job's summary."""
    scores.attrs["missing"] = why
    log.warning("split %r: %s", split, why)


def score_split_duckdb(split: str, tables: Tables, el2n_epoch: int | None = None,
                       done: Callable[[int], None] | None = None, progress: bool = True) -> pd.DataFrame:
    """The loss sums from one DuckDB query over the split's files: for runs whose sums outgrow memory.

    Only `action`, `action_<part>` and `mean_loss`: the dynamics scores need the arrow engine. The
    query needs every file at once: it waits for all of them (one query plans and spills as a whole).
    """
    from tracking.scoring.duckdb_engine import score_tables_duckdb

    paths = [[table_source(part) for _, part in source] if isinstance(source, list) else table_source(source)
             for _, source in tables]
    files = [file for epoch in paths for file in files_of(epoch)]
    if not all(isinstance(path, Path) for path in files):  # the job keeps a non-streaming engine's files on disk
        raise TypeError("the duckdb engine reads files on disk, not tables in memory")
    scores = score_tables_duckdb(paths, split)
    columns = pq.read_schema(files[0]).names  # checked readable by the query's first step
    for epoch in range(len(paths)) if done is not None else ():
        done(epoch)
    if dynamics_expected(columns):
        _missing(scores, split, "no training-dynamics scores: the duckdb engine sums losses only (use --engine arrow)")
    return scores


@dataclass(frozen=True)
class Engine:
    """A scoring engine (`--engine`): its function, and whether it folds each table as it arrives
    (`streams`: the job fetches a few tables ahead) or needs every file of a split at once."""

    # (split, tables, el2n_epoch, done, progress) -> the scores: a DataFrame (arrow, duckdb), or for spark a
    # `SparkScores` that keeps them in Spark and writes and reports them itself (`tracking.scoring.spark_engine`)
    score: Callable[..., Any]
    streams: bool


# Scoring engines by name: both give the scores table of the contract.
ENGINES: dict[str, Engine] = {
    "arrow": Engine(score_split, streams=True),
    "duckdb": Engine(score_split_duckdb, streams=False),
    "spark": Engine(score_split_spark, streams=False),
}
