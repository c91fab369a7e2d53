"""`--engine spark`: the scores of one split as Spark aggregations over its parquet files.

Every file of the split (an epoch's table, or each part of a sharded epoch) is read by Spark with its epoch and
part as literal columns and its row position (`_metadata.row_index`). One window over each sample's rows,
ordered by (epoch, part, row), keeps the first occurrence of an id in an epoch (`_KEEP`, the contract's rule)
and carries the previous epoch's `correct` for forgetting; one group-by per sample then folds every score the
registry marks `spark` (`AGGREGATIONS`), with no Python UDF: one shuffle, by sample_id. The per-sample result
stays in Spark (`SparkScores`): the checks, `rank` and the regions' variability cut (`_positions`: range
partitions, no window over one partition), the run's metrics, the panels' top-k (`SparkScores.report`) and
`scores.parquet` or its parts (`SparkScores.write`) are Spark queries; only the top-k rows reach the driver.

The session is the active `SparkSession` when one exists (a cluster, `spark-submit`, Databricks), else one
made on `spark_session(master)` (default `local[*]`); Spark needs Java 17 or newer.
"""

from __future__ import annotations

import operator
import os
import shutil
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.scoring import regions
from tracking.scoring.rank import Picked, easiest, hardest
from tracking.scoring.registry import SCORES, arrow_only, score_of_column
from tracking.scoring.registry import higher_is_harder as registered_direction
from tracking.scoring.tables import check_schema, dynamics_expected, recorded_columns

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

DEFAULT_MASTER = "local[*]"
JAVA_HELP = ("Spark needs Java 17 or newer and no 'java' was found on PATH or in JAVA_HOME: install it "
             "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless; or `bash scripts/setup.sh spark`), "
             "or use --engine arrow")
_EPOCH, _PART, _ROW, _SHARDED = "_epoch", "_part", "_row", "_sharded"  # columns each file's rows get
_KEEP, _PREVIOUS_RIGHT = "_keep", "_previous_right"  # the window's: first occurrence, correct at the epoch before
_REPEATS, _NULLS = "_repeats", "_nulls"  # per sample: rows repeated in a single-file epoch, rows with a null
_PARTITION, _LOCAL = "_partition", "_local"  # `_positions`: a row's partition and its place there
_COLUMN, _WHICH, _GROUP, _AT = "_column", "_which", "_group", "_at"  # `_top_rows`: which panel a row is for
PARTS_ABOVE_CONF = "spark.action_scores.scoresPartsAbove"
SCORES_PARTS_ABOVE = 5_000_000
"""Samples above which Spark writes a split's scores as `scores/part-RRRRR.parquet` (about this many rows per
part, sorted by sample_id) instead of one `scores.parquet`; set another with the Spark conf `PARTS_ABOVE_CONF`
(`spark-submit --conf spark.action_scores.scoresPartsAbove=1000000`, or `spark.conf.set` on the session)."""


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


@dataclass
class SparkScores:
    """One split's scores as a persisted Spark DataFrame (the contract's columns, one row per sample): the job
    writes, sums and draws them through these methods, and only the panels' top-k rows reach the driver."""

    frame: DataFrame
    samples: int
    epochs: int
    action: dict[str, float]  # mean, max, min of `action` over the split, for the run's metrics
    attrs: dict[str, str] = field(default_factory=dict)  # as a pandas frame's: "missing", for the job's summary

    def __len__(self) -> int:
        return self.samples

    def write(self, split_out: Path) -> Path:
        """Spark writes the scores, sorted by sample_id: `scores.parquet`, or above `PARTS_ABOVE_CONF` samples
        the folder `scores/` of `part-RRRRR.parquet` (ranges of ids in part order). Returns what it wrote."""
        F = _f()
        split_out.mkdir(parents=True)
        above = int(self.frame.sparkSession.conf.get(PARTS_ABOVE_CONF, str(SCORES_PARTS_ABOVE)))
        staging = split_out / "_spark_write"
        parts = -(-self.samples // max(above, 1))
        spread = (self.frame.coalesce(1) if parts == 1 else  # one file: no shuffle, one task sorts it
                  self.frame.repartitionByRange(parts, F.col(contract.SAMPLE_ID)))
        spread.sortWithinPartitions(contract.SAMPLE_ID).write.parquet(str(staging))
        written = sorted(staging.glob("part-*.parquet"), key=lambda path: int(path.name.split("-")[1]))
        if parts == 1:
            target = split_out / contract.SCORES_FILE
            written[0].rename(target)
        else:
            target = split_out / contract.SCORES_PARTS_DIR
            target.mkdir()
            for number, path in enumerate(written):
                path.rename(target / contract.part_file_name(number))
        shutil.rmtree(staging)  # Spark's _SUCCESS and .crc files
        return target

    def metrics(self, split: str) -> dict[str, float]:
        """`job.split_metrics`, from the checks' aggregation (`_check`)."""
        return {f"action_scores.{split}.samples": self.samples, f"action_scores.{split}.epochs": self.epochs,
                **{f"action_scores.{split}.action_{name}": value for name, value in self.action.items()}}

    def report(self, split: str, run, media: Path | None, options, split_out: Path):  # noqa: ANN001, ANN201
        """`job.report_split` from the panels' rows only: the `top_k` hardest and easiest samples by each score
        in its direction (one collect) and, where the view has groups (classes), for the per-loss-part scores
        per recorded `label` (a second collect; the view is then made again with those rows); the split's and
        each group's size are counted in Spark. The data map, the per-class distribution and the browse page
        plot every sample: with this engine they are not drawn."""
        from tracking.job import SplitReport, objectives, render_split, write_text_tables
        from tracking.report.views import choose_view

        def view_of(rows: pd.DataFrame):  # noqa: ANN202 - a SplitView or None, and why not
            return choose_view(rows, split, media=media, task=run.task, dataset=run.params.get(contract.DATASET_PARAM),
                               data_root=options.data_root or run.params.get(contract.DATA_ROOT_PARAM) or None,
                               pictures=options.picture_function)

        columns = list(objectives(pd.DataFrame(columns=self.frame.columns)).values())
        kept = self._top_rows(options.top_k, columns, by_label=False)
        view, why_not = view_of(_rows_of(kept))
        if view is not None and view.groups is not None and "label" in self.frame.columns:
            kept = pd.concat([kept, self._top_rows(options.top_k, columns, by_label=True)], ignore_index=True)
            view, why_not = view_of(_rows_of(kept))
        rows = _rows_of(kept)
        report = SplitReport(why_not=why_not)
        if view is None:
            return report
        shown = view.frame(rows)
        shown.index = shown[contract.SAMPLE_ID].to_numpy()
        grouped = view.groups is not None and _GROUP in kept and kept[_GROUP].notna().any()
        sizes = ({row["label"]: row["count"] for row in self.frame.groupBy("label").count().collect()}
                 if grouped else {})
        picks = {}
        for column in objectives(shown).values():
            harder, mine = registered_direction(column), kept[kept[_COLUMN] == column]

            def top(which: str, label: object = None, column: str = column, harder: bool = harder,
                    mine: pd.DataFrame = mine) -> pd.DataFrame:
                group = mine[_GROUP].isna() if label is None else mine[_GROUP] == label
                chosen = mine[(mine[_WHICH] == which) & group]
                frame = shown.loc[chosen[contract.SAMPLE_ID].to_numpy()]
                return (hardest if which == "hardest" else easiest)(frame, column, options.top_k, harder)

            by_group = {}
            if grouped and score_of_column(column).per_loss_part:
                for label, size in sizes.items():
                    hard, easy = top("hardest", label), top("easiest", label)
                    by_group[hard[view.groups].iloc[0]] = (hard, easy, int(size))
            picks[column] = Picked(column, harder, self.samples, top("hardest"), top("easiest"),
                                   dict(sorted(by_group.items())))
        report.written, report.samples = render_split(shown, view, options.top_k, split_out, picks)
        report.written += write_text_tables(report.samples, view, split_out)
        report.source = view.source
        return report

    def _top_rows(self, top_k: int, columns: list[str], by_label: bool) -> pd.DataFrame:
        """One collect of the `top_k` hardest and easiest rows by each of `columns` (tagged `_COLUMN`, `_WHICH`;
        `_GROUP` null), or with `by_label` of each recorded `label`'s (`_GROUP`) for the per-loss-part ones."""
        from pyspark.sql import Window

        F = _f()
        kind = self.frame.schema["label"].dataType if "label" in self.frame.columns else "long"
        queries = []
        for column in columns if not by_label else [c for c in columns if score_of_column(c).per_loss_part]:
            for which, harder_first in (("hardest", registered_direction(column)),
                                        ("easiest", not registered_direction(column))):
                tags = [F.lit(column).alias(_COLUMN), F.lit(which).alias(_WHICH)]
                order = _order(column, harder_first)
                if not by_label:
                    queries.append(self.frame.orderBy(*order).limit(top_k).select("*", *tags,
                                                                                  F.lit(None).cast(kind).alias(_GROUP)))
                else:
                    within = F.row_number().over(Window.partitionBy("label").orderBy(*order))
                    queries.append(self.frame.withColumn(_AT, within).filter(F.col(_AT) <= top_k).drop(_AT)
                                   .select("*", *tags, F.col("label").alias(_GROUP)))
        self.frame.sparkSession.conf.set("spark.sql.execution.arrow.pyspark.enabled", "true")
        return reduce(lambda one, other: one.unionByName(other), queries).toPandas()


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
                      done: Callable[[int], None] | None = None, progress: bool = True) -> SparkScores:
    """Scores of one split by Spark: the columns and values of `engines.score_split`, kept in Spark
    (`SparkScores`): the checks, `rank`, the regions, the metrics and the panels' top-k run there, and
    `SparkScores.write` has Spark write `scores.parquet` (or its parts).

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
    rows = _rows(spark, files, columns)
    values = [c for c in columns if c not in (contract.SAMPLE_ID, contract.TARGET)]
    checks = {
        "epochs": F.sum(F.col(_KEEP).cast("long")),
        _REPEATS: F.sum((~F.col(_KEEP) & ~F.col(_SHARDED)).cast("long")),
        _NULLS: F.sum((F.col(_KEEP) & reduce(operator.or_, [F.col(c).isNull() for c in values])).cast("long")),
    }
    if label:
        checks["label"] = F.max(F.when(F.col(_KEEP) & (F.col(_EPOCH) == 0), F.col(contract.TARGET)))
    per_sample = rows.groupBy(contract.SAMPLE_ID).agg(
        *[v.alias(k) for k, v in (checks | aggregates).items()]).persist()
    cached = [per_sample]  # every persisted frame, unpersisted when the SparkScores goes
    samples, action = _check(split, per_sample, list(aggregates), rows, files, epochs)
    for epoch in range(epochs) if done is not None else ():
        done(epoch)
    scored = per_sample.withColumn("epochs", F.col("epochs").cast("long"))
    if all(name in aggregates for name in regions.NEEDS):
        scored = scored.withColumn(regions.REGION, _region(scored, samples, cached))
    scored = _positions(scored, _order("action", registered_direction("action")), "rank", cached)
    ordered = [contract.SAMPLE_ID, "epochs", *aggregates, "rank", *(["label"] if label else []),
               *([regions.REGION] if regions.REGION in scored.columns else [])]
    scores = SparkScores(scored.select(*ordered).persist(), samples, epochs, action)  # computed once, by the write
    cached.append(scores.frame)
    weakref.finalize(scores, _unpersist, cached)
    if missing and dynamics_expected(all_columns):
        reasons: dict[str, list[str]] = {}
        for score, why in missing.items():
            reasons.setdefault(why, []).append(score)
        _missing(scores, split, "; ".join(f"no {', '.join(names)}: {why}" for why, names in reasons.items()))
    return scores


def _rows_of(kept: pd.DataFrame) -> pd.DataFrame:
    """The distinct sample rows of `SparkScores._top_rows`' tagged rows."""
    return kept.drop(columns=[_COLUMN, _WHICH, _GROUP]).drop_duplicates(contract.SAMPLE_ID, ignore_index=True)


def _unpersist(frames: list[DataFrame]) -> None:
    """Free Spark's cache of a split once its `SparkScores` is gone (the job moves on to the next split)."""
    for frame in frames:
        frame.unpersist()


def _order(column: str, harder_first: bool) -> list[Column]:
    """`rank.py`'s order in Spark: `column` highest first when `harder_first`, ties by ascending sample_id."""
    F = _f()
    return [F.col(column).desc() if harder_first else F.col(column).asc(), F.col(contract.SAMPLE_ID).asc()]


def _positions(frame: DataFrame, order: list[Column], name: str, cached: list[DataFrame]) -> DataFrame:
    """`frame` with `name`: each row's 1-based position in `order` (a total order), computed without a
    window over one partition: rows are range-partitioned and sorted within each partition, numbered there
    (`monotonically_increasing_id` counts rows per partition in its low 33 bits), and each partition's offset
    comes from its row count (one small collect). The numbered rows are persisted, and added to `cached`."""
    F = _f()
    numbered = (frame.repartitionByRange(*order).sortWithinPartitions(*order)
                .withColumn(_PARTITION, F.spark_partition_id())
                .withColumn(_LOCAL, F.monotonically_increasing_id().bitwiseAND((1 << 33) - 1))
                .persist())  # one evaluation: the counts and the positions see the same partitions
    cached.append(numbered)
    counts = sorted((row[_PARTITION], row["count"]) for row in numbered.groupBy(_PARTITION).count().collect())
    offsets, total = [], 0
    for partition, count in counts:
        offsets += [F.lit(partition), F.lit(total)]
        total += count
    offset = F.element_at(F.create_map(*offsets), F.col(_PARTITION)) if offsets else F.lit(0)
    return numbered.withColumn(name, (offset + F.col(_LOCAL) + 1).cast("long")).drop(_PARTITION, _LOCAL)


def _region(scores: DataFrame, samples: int, cached: list[DataFrame]) -> Column:
    """`regions.assign` in Spark: the variability cut is the (n // 3 + 1)-th largest variability, found by
    its position in ascending order (`_positions`), then one expression per row."""
    F = _f()
    position = samples - samples // regions.AMBIGUOUS_SHARE  # 1-based, ascending
    by_variability = _positions(scores.select(contract.SAMPLE_ID, "variability"), _order("variability", False), "_at",
                                cached)
    cut = by_variability.filter(F.col("_at") == position).first()["variability"]
    return (F.when(F.col("variability") > F.lit(cut), regions.AMBIGUOUS)
            .when(F.col("confidence") >= regions.EASY_CONFIDENCE, regions.EASY).otherwise(regions.HARD))


def _check(split: str, per_sample: DataFrame, scores: list[str], rows: DataFrame,
           files: list[tuple[int, int, bool, str, Path]], epochs: int) -> tuple[int, dict[str, float]]:
    """The arrow engine's refusals, as one aggregation over the per-sample rows (the ids named come from small
    queries, on the error path only): an empty split, an id repeated in a single-file epoch, a sample not in
    every epoch (naming the epochs it lacks), nulls, NaN or infinite values. Returns the number of samples and
    the mean, max and min of `action` (the run's metrics, from the same pass)."""
    F = _f()
    floats = [c for c, kind in per_sample.dtypes if c in scores and kind == "double"]
    finite = reduce(operator.and_, [~F.isnan(c) & (F.abs(c) != float("inf")) for c in floats], F.lit(True))
    problems = {
        "null_ids": F.col(contract.SAMPLE_ID).isNull(),
        "repeated": F.col(_REPEATS) > 0,
        "absent": F.col("epochs") != epochs,
        "nulls": F.col(_NULLS) > 0,
        "non_finite": ~finite,
    }
    action = {"mean": F.mean("action"), "max": F.max("action"), "min": F.min("action")}
    found = per_sample.agg(F.count(F.lit(1)).alias("samples"), *[v.alias(k) for k, v in action.items()],
                           *[F.sum(test.cast("long")).alias(name) for name, test in problems.items()]).first()
    if not found["samples"]:
        raise ActionScoresError(f"split {split!r}: the epoch tables have no rows")
    if found["null_ids"]:
        raise ActionScoresError(f"split {split!r}: column 'sample_id' has nulls")

    def first_ids(name: str, most: int = 10) -> np.ndarray:
        """The `most` lowest ids of the samples with problem `name`."""
        picked = per_sample.filter(problems[name]).select(contract.SAMPLE_ID).orderBy(contract.SAMPLE_ID).limit(most)
        return np.array([row[0] for row in picked.collect()], dtype=np.int64)

    def some(name: str) -> str:
        """`preview` of the ids with problem `name`, counted in Spark: `[3, 7] and 12 more`."""
        ids, total = first_ids(name), int(found[name])
        return preview(ids) + (f" and {total - len(ids)} more" if total > len(ids) else "")

    if found["repeated"]:
        where = (rows.filter(~F.col(_KEEP) & ~F.col(_SHARDED)).select(_EPOCH).distinct().orderBy(_EPOCH).limit(3)
                 .toPandas()[_EPOCH].tolist())  # which tables
        names = {epoch: name for epoch, _, _, name, _ in files}
        raise ActionScoresError(f"split {split!r}: repeated sample ids {some('repeated')} in "
                                f"{', '.join(names[epoch] for epoch in where)}")
    if found["absent"]:
        raise ActionScoresError(f"split {split!r}: samples {some('absent')} are not in every epoch: "
                                f"{_absent_from(rows, first_ids('absent', 5), files, epochs)}")
    if found["nulls"]:
        raise ActionScoresError(f"split {split!r}: null values in samples {some('nulls')}")
    if found["non_finite"]:
        raise ActionScoresError(f"split {split!r} has NaN or infinite values, which would corrupt the sums, in "
                                f"samples {some('non_finite')}")
    return int(found["samples"]), {name: float(found[name]) for name in action}
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
