"""`--engine spark`: the scores of one split as Spark aggregations over its parquet files.

Every file of the split (an epoch's table, or each part of a sharded epoch) is read by Spark with its epoch and
part as literal columns and its row position (`_metadata.row_index`). One window over each sample's rows,
ordered by (epoch, part, row), keeps the first occurrence of an id in an epoch (`_KEEP`, the contract's rule)
and carries the previous epoch's `correct` for forgetting; one group-by per sample then folds every score the
registry marks `spark` (`AGGREGATIONS`), with no Python UDF: one shuffle, by sample_id. The per-sample result
comes back as pandas for the job's rank, regions, panels and `scores.parquet`, as from the other engines.

The session is the active `SparkSession` when one exists (a cluster, `spark-submit`, Databricks), else one
made on `spark_session(master)` (default `local[*]`); Spark needs Java 17 or newer.
"""

from __future__ import annotations

import operator
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.scoring import regions
from tracking.scoring.rank import rank
from tracking.scoring.registry import SCORES, arrow_only
from tracking.scoring.tables import check_schema, dynamics_expected, recorded_columns

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

DEFAULT_MASTER = "local[*]"
JAVA_HELP = ("Spark needs Java 17 or newer and no 'java' was found on PATH or in JAVA_HOME: install it "
             "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless; or `bash scripts/setup.sh spark`), "
             "or use --engine arrow")
_EPOCH, _PART, _ROW, _SHARDED = "_epoch", "_part", "_row", "_sharded"  # columns each file's rows get
_KEEP, _PREVIOUS_RIGHT = "_keep", "_previous_right"  # the window's: first occurrence, correct at the epoch before


def spark_session(master: str | None = None) -> SparkSession:
    """The active SparkSession, else one on `master` (default `local[*]`); a missing Java is an error saying so."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ActionScoresError("--engine spark needs pyspark: pip install 'action-scores[spark]'") from None
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    java_home = os.environ.get("JAVA_HOME")
    if not (java_home and Path(java_home, "bin", "java").exists()) and shutil.which("java") is None:
        raise ActionScoresError(JAVA_HELP)
    return (SparkSession.builder.master(master or DEFAULT_MASTER).appName("action-scores")
            .config("spark.ui.showConsoleProgress", "false").getOrCreate())


@dataclass(frozen=True)
class _Split:
    """What the aggregations of one split need to know."""

    loss_columns: list[str]
    epochs: int
    el2n_epoch: int


def _f():  # noqa: ANN202 - pyspark's functions module, imported only when the engine runs
    from pyspark.sql import functions

    return functions


def _kept(column: str) -> Column:
    """`column` on the rows kept (an id's first occurrence in its epoch), null on the others."""
    F = _f()
    return F.when(F.col(_KEEP), F.col(column))


def _per_epoch_mean(column: str, split: _Split) -> Column:
    return _f().sum(_kept(column)) / split.epochs


def _action(split: _Split) -> dict[str, Column]:
    return {contract.action_column(c): _f().sum(_kept(c)) for c in split.loss_columns}


def _forgetting(split: _Split) -> dict[str, Column]:
    F = _f()
    forgot = F.col(_KEEP) & (F.col(_PREVIOUS_RIGHT) == 1) & (F.col(contract.CORRECT) == 0)
    learned = F.max(_kept(contract.CORRECT)) == 1
    return {"forgetting": F.when(learned, F.sum(forgot.cast("long"))).otherwise(F.lit(split.epochs)).cast("long")}


def _el2n(split: _Split) -> dict[str, Column]:
    F = _f()
    return {"el2n": F.max(F.when(F.col(_KEEP) & (F.col(_EPOCH) == split.el2n_epoch), F.col(contract.EL2N)))}


AGGREGATIONS: dict[str, Callable[[_Split], dict[str, Column]]] = {
    "action": _action,
    "mean_loss": lambda split: {"mean_loss": _per_epoch_mean(contract.LOSS, split)},
    "confidence": lambda split: {"confidence": _per_epoch_mean(contract.P_TRUE, split)},
    "variability": lambda split: {"variability": _f().stddev_pop(_kept(contract.P_TRUE))},
    "correctness": lambda split: {"correctness": _per_epoch_mean(contract.CORRECT, split)},
    "forgetting": _forgetting,
    "aum": lambda split: {"aum": _per_epoch_mean(contract.MARGIN, split)},
    "el2n": _el2n,
}
"""Each registered score that `Score.spark` marks, as Spark aggregations over a sample's rows (output column ->
aggregate); the per-loss-part score gives one column per loss column."""


def _files(tables) -> list[tuple[int, int, bool, str, Path]]:  # noqa: ANN001 - engines.Tables
    """(epoch, part, sharded, name, local path) of every file of the split, waiting for those still arriving."""
    from tracking.scoring.engines import table_source

    found = []
    for epoch, (name, source) in enumerate(tables):
        parts = source if isinstance(source, list) else [(name, source)]
        for part, (part_name, table) in enumerate(parts):
            path = table_source(table)
            if not isinstance(path, Path):  # the job keeps a non-streaming engine's files on disk
                raise ActionScoresError(f"{part_name}: the spark engine reads files on disk, not tables in memory")
            found.append((epoch, part, isinstance(source, list), part_name, path))
    return found


def _check_footers(files: list[tuple[int, int, bool, str, Path]]) -> tuple[list[str], frozenset[str], list[str]]:
    """Every file's schema checked as the arrow engine checks it, and its loss and recorded columns the first
    file's: (loss columns, recorded columns, all columns) of the split. Reads footers only."""
    first: tuple[str, list[str], frozenset[str], list] | None = None
    for _, _, _, name, path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, ValueError) as error:
            raise ActionScoresError(f"{name} is not a readable parquet file: {error}") from None
        check_schema(schema, name)
        losses, sources = contract.loss_columns(schema.names), recorded_columns(schema, name)
        if first is None:
            first = (name, losses, sources, schema.names)
        elif sorted(losses) != sorted(first[1]):
            raise ActionScoresError(f"{name}: loss columns {sorted(losses)} differ from {first[0]}'s {sorted(first[1])}")
        elif sources != first[2]:
            raise ActionScoresError(f"{name}: per-sample columns {sorted(sources)} differ from {first[0]}'s "
                                    f"{sorted(first[2])}")
    assert first is not None
    return first[1], first[2], first[3]


def _rows(spark: SparkSession, files: list[tuple[int, int, bool, str, Path]], columns: list[str]) -> DataFrame:
    """Every row of the split with its epoch, part, row position and whether its epoch is sharded; the first
    occurrence of an id in its epoch marked `_KEEP`, and `_PREVIOUS_RIGHT` the kept `correct` of the epoch
    before (where the tables have `correct`)."""
    from pyspark.sql import Window

    F = _f()
    kinds = {contract.SAMPLE_ID: "long", contract.CORRECT: "int"}  # the target as recorded; the rest float64
    typed = [F.col(c) if c == contract.TARGET else F.col(c).cast(kinds.get(c, "double")).alias(c) for c in columns]
    reads = [spark.read.parquet(str(path)).select(
        *typed,
        F.lit(epoch).alias(_EPOCH), F.lit(part).alias(_PART), F.col("_metadata.row_index").alias(_ROW),
        F.lit(sharded).alias(_SHARDED)) for epoch, part, sharded, _, path in files]
    rows = reduce(lambda one, other: one.unionByName(other), reads)
    order = Window.partitionBy(contract.SAMPLE_ID).orderBy(_EPOCH, _PART, _ROW)
    previous_epoch = F.lag(_EPOCH).over(order)
    rows = rows.withColumn(_KEEP, previous_epoch.isNull() | (previous_epoch != F.col(_EPOCH)))
    if contract.CORRECT in columns:
        before = order.rowsBetween(Window.unboundedPreceding, -1)
        rows = rows.withColumn(_PREVIOUS_RIGHT, F.last(_kept(contract.CORRECT), ignorenulls=True).over(before))
    return rows


def score_split_spark(split: str, tables, el2n_epoch: int | None = None,  # noqa: ANN001 - engines.Tables
                      done: Callable[[int], None] | None = None, progress: bool = True) -> pd.DataFrame:
    """Scores of one split by Spark: the contract of `engines.score_split`, the same columns and values.

    Needs every file of the split on disk (`streams=False`); `done(epoch)` is called for each epoch once Spark
    has read them all. Scores marked arrow-only in the registry are left out, named in the warning.
    """
    from tracking.scoring.engines import _missing, default_el2n_epoch

    spark = spark_session()  # first: pyspark's column functions need a session (the active one, or one made here)
    F = _f()
    files = _files(tables)
    epochs = len(tables)
    chosen = default_el2n_epoch(epochs) if el2n_epoch is None else el2n_epoch
    loss_columns, sources, all_columns = _check_footers(files)
    available = set(loss_columns) | sources
    missing: dict[str, str] = {}
    aggregates: dict[str, Column] = {}
    facts = _Split(loss_columns, epochs, chosen)
    for score in SCORES.values():
        lacking = [column for column in score.columns if column not in available]
        if lacking:
            missing[score.name] = f"the tables have no {lacking[0]!r} column (recorded by tracking.record.classification_columns)"
        elif score.name in arrow_only():
            missing[score.name] = "arrow-only in the registry (use --engine arrow)"
        else:
            aggregates |= AGGREGATIONS[score.name](facts)
    if "el2n" in aggregates and not 0 <= chosen < epochs:
        raise ActionScoresError(f"split {split!r}: el2n epoch {chosen} is not one of the run's epochs 0..{epochs - 1}")
    label = contract.TARGET in all_columns
    columns = [contract.SAMPLE_ID, *loss_columns, *(c for c in contract.RECORDED_COLUMNS if c in sources),
               *([contract.TARGET] if label else [])]
    spark.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
    rows = _rows(spark, files, columns)
    values = [c for c in columns if c not in (contract.SAMPLE_ID, contract.TARGET)]
    checks = {
        "epochs": F.sum(F.col(_KEEP).cast("long")),
        "_repeats": F.sum((~F.col(_KEEP) & ~F.col(_SHARDED)).cast("long")),
        "_nulls": F.sum((F.col(_KEEP) & reduce(operator.or_, [F.col(c).isNull() for c in values])).cast("long")),
    }
    if label:
        checks["label"] = F.max(F.when(F.col(_KEEP) & (F.col(_EPOCH) == 0), F.col(contract.TARGET)))
    scores = rows.groupBy(contract.SAMPLE_ID).agg(*[v.alias(k) for k, v in (checks | aggregates).items()]).toPandas()
    _check(split, scores, rows, files, epochs)  # before `done`: naming the epochs a sample lacks reads them again
    for epoch in range(epochs) if done is not None else ():
        done(epoch)
    scores = scores.sort_values(contract.SAMPLE_ID, ignore_index=True)
    scores[[contract.SAMPLE_ID, "epochs"]] = scores[[contract.SAMPLE_ID, "epochs"]].astype(np.int64)
    scores["rank"] = rank(scores, "action")
    if all(name in scores for name in regions.NEEDS):
        scores[regions.REGION] = regions.assign(scores["confidence"].to_numpy(), scores["variability"].to_numpy())
    ordered = [contract.SAMPLE_ID, "epochs", *aggregates, "rank", *(["label"] if label else []),
               *([regions.REGION] if regions.REGION in scores else [])]
    scores = scores[ordered]
    if missing and dynamics_expected(all_columns):
        reasons: dict[str, list[str]] = {}
        for score, why in missing.items():
            reasons.setdefault(why, []).append(score)
        _missing(scores, split, "; ".join(f"no {', '.join(names)}: {why}" for why, names in reasons.items()))
    return scores


def _check(split: str, scores: pd.DataFrame, rows: DataFrame,
           files: list[tuple[int, int, bool, str, Path]], epochs: int) -> None:
    """The arrow engine's refusals: an empty split, an id repeated in a single-file epoch, a sample not in
    every epoch (naming the epochs it lacks), nulls, NaN or infinite values."""
    if scores.empty:
        raise ActionScoresError(f"split {split!r}: the epoch tables have no rows")
    ids = scores[contract.SAMPLE_ID]
    if ids.isna().any():
        raise ActionScoresError(f"split {split!r}: column 'sample_id' has nulls")
    repeated = ids[scores.pop("_repeats").to_numpy() > 0]
    if len(repeated):
        F = _f()
        where = (rows.filter(~F.col(_KEEP) & ~F.col(_SHARDED)).select(_EPOCH).distinct().orderBy(_EPOCH).limit(3)
                 .toPandas()[_EPOCH].tolist())  # the error path only: which tables
        names = {epoch: name for epoch, _, _, name, _ in files}
        raise ActionScoresError(f"split {split!r}: repeated sample ids {preview(np.sort(repeated.to_numpy()))} in "
                                f"{', '.join(names[epoch] for epoch in where)}")
    absent = ids[scores["epochs"].to_numpy() != epochs].sort_values()
    if len(absent):
        raise ActionScoresError(f"split {split!r}: samples {preview(absent.to_numpy())} are not in every epoch: "
                                f"{_absent_from(rows, absent.to_numpy()[:5], files, epochs)}")
    nulls = ids[scores.pop("_nulls").to_numpy() > 0]
    if len(nulls):
        raise ActionScoresError(f"split {split!r}: null values in samples {preview(np.sort(nulls.to_numpy()))}")
    floats = [c for c in scores.columns if pd.api.types.is_float_dtype(scores[c]) and c != "label"]
    bad = ids[~np.isfinite(scores[floats].to_numpy(np.float64)).all(axis=1)]
    if len(bad):
        raise ActionScoresError(f"split {split!r} has NaN or infinite values, which would corrupt the sums, in "
                                f"samples {preview(np.sort(bad.to_numpy()))}")


def _absent_from(rows: DataFrame, ids: np.ndarray, files: list[tuple[int, int, bool, str, Path]],
                 epochs: int) -> str:
    """Which epochs (by their table or folder) lack each of a few samples: a small query, on the error path only."""
    F = _f()
    found = (rows.filter(F.col(contract.SAMPLE_ID).isin([int(i) for i in ids]) & F.col(_KEEP))
             .groupBy(contract.SAMPLE_ID).agg(F.collect_set(_EPOCH).alias("in")).toPandas())
    present = {int(row[contract.SAMPLE_ID]): set(row["in"]) for _, row in found.iterrows()}
    names = {epoch: name.rsplit("/", 1)[0] + "/" if sharded else name for epoch, _, sharded, name, _ in files}
    return "; ".join(f"{int(i)} missing from {', '.join(names[e] for e in range(epochs) if e not in present.get(int(i), ()))}"
                     for i in ids)
