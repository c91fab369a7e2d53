"""DuckDB as the fallback scoring engine, for runs whose per-sample sums would not fit in memory.

The per-epoch tables of a split are one parquet dataset to DuckDB: one query sums `loss`
and every `loss_<part>` per `sample_id` and counts the epochs, spilling to disk when
its hash table outgrows memory; in a split of sharded epochs it leaves out each id's later copies in an
epoch (`later_copies`, `sharded_query`). The result has the columns of the default engine
(`tracking.scoring.accumulator`), so either can feed ranks, panels and the scores artifact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview
from tracking.scoring.rank import rank
from tracking.scoring.tables import (epoch_files, files_of, first_occurrences, read_epoch_table, read_part_table,
                                    union_of_parts)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def action_query(loss_columns: list[str], label: str | None, epochs: int) -> str:
    """The query over `read_parquet($files)`: sums as float64, epochs per sample, label of the first file.

    `each_epoch_once` compares the sum of the hashes of the sample's file positions with that
    of 0..epochs-1: with the count, it catches a sample repeated in one file and missing from
    another, which a count alone misses (a wrong pass needs a 64-bit hash coincidence), at a
    few percent of the query's time where an exact count(DISTINCT) costs 7x.
    """
    sums = ", ".join(
        f"sum({_quoted(column)}::DOUBLE) AS {_quoted(contract.action_column(column))}"
        for column in loss_columns
    )
    # The file name only orders the label's epochs: a string per row, so only read when needed.
    first_label = f", arg_min({_quoted(label)}, filename) AS label" if label else ""
    return (
        f"SELECT {_quoted(contract.SAMPLE_ID)}, count(*) AS epochs, {sums}{first_label},\n"
        f"       sum(hash(file_index::BIGINT)) = (SELECT sum(hash(i)) FROM range({int(epochs)}) t(i)) AS each_epoch_once\n"
        f"FROM read_parquet($files{', filename = true' if label else ''})\n"
        f"GROUP BY {_quoted(contract.SAMPLE_ID)}\n"
        f"ORDER BY {_quoted(contract.SAMPLE_ID)}"
    )


def sharded_query(loss_columns: list[str], label: str | None, epochs: int, files: int) -> str:
    """`action_query` over a split whose epochs may be in parts: `$epoch_of` gives each file's epoch, and the
    rows `later_copies` found (`$drop_files`, `$drop_rows`: file index and row number) are left out, so each
    epoch counts each id once, by its first occurrence. `each_epoch_once` hashes the epoch, not the file."""
    sums = ", ".join(
        f"sum({_quoted(column)}::DOUBLE) AS {_quoted(contract.action_column(column))}" for column in loss_columns
    )
    read = ", ".join(_quoted(column) for column in [contract.SAMPLE_ID, *loss_columns, *([label] if label else [])])
    first_label = f", arg_min({_quoted(label)}, epoch) AS label" if label else ""
    return (
        f"SELECT {_quoted(contract.SAMPLE_ID)}, count(*) AS epochs, {sums}{first_label},\n"
        f"       sum(hash(epoch::BIGINT)) = (SELECT sum(hash(i)) FROM range({int(epochs)}) t(i)) AS each_epoch_once\n"
        f"FROM (SELECT {read}, file_index::BIGINT AS file_index, file_row_number::BIGINT AS file_row_number\n"
        f"      FROM read_parquet($files, file_row_number = true))\n"
        f"JOIN (SELECT unnest($epoch_of::BIGINT[]) AS epoch, unnest(range({int(files)})) AS file_index)\n"
        f"  USING (file_index)\n"
        f"ANTI JOIN (SELECT unnest($drop_files::BIGINT[]) AS file_index,\n"
        f"                  unnest($drop_rows::BIGINT[]) AS file_row_number)\n"
        f"  USING (file_index, file_row_number)\n"
        f"GROUP BY {_quoted(contract.SAMPLE_ID)}\n"
        f"ORDER BY {_quoted(contract.SAMPLE_ID)}"
    )


def later_copies(epochs: list[Epoch]) -> tuple[list[int], list[int]]:
    """(file index, row number) in the split's list of files of every row a sharded epoch leaves out: each id's
    occurrences after its first (`tables.first_occurrences`). Reads only the ids, one epoch at a time: memory
    O(samples)."""
    files, rows, start = [], [], 0
    for epoch in epochs:
        parts = files_of(epoch)
        if isinstance(epoch, list):
            ids = [_ids(part) for part in parts]
            lengths = [len(part_ids) for part_ids in ids]
            dropped = np.ones(sum(lengths), dtype=bool)
            dropped[first_occurrences(np.concatenate(ids))] = False
            files += np.repeat(np.arange(start, start + len(parts)), lengths)[dropped].tolist()
            rows += np.concatenate([np.arange(length) for length in lengths])[dropped].tolist()
        start += len(parts)
    return files, rows


def _ids(path: Path) -> np.ndarray:
    try:
        return pq.read_table(path, columns=[contract.SAMPLE_ID]).column(0).to_numpy()
    except (pa.ArrowException, OSError) as error:
        raise ActionScoresError(f"{_name(path)} is not a readable parquet file: {error}") from None


Epoch = Path | list[Path]  # an epoch's file, or its parts in part order


def epoch_paths(folder: str | Path, split: str) -> list[Epoch]:
    """The split's epochs under `folder` (its `epoch_EEEE.parquet` files, or `epoch_EEEE/part-RRRRR.parquet`
    folders), in epoch order, refusing what `tables.epoch_files` refuses."""

    root = Path(folder)
    names = [f"{contract.losses_dir(split)}/{path.relative_to(root).as_posix()}"
             for path in sorted(root.rglob("*")) if path.is_file()]
    grouped = epoch_files(names)
    if split not in grouped:
        raise ActionScoresError(f"{root}: no epoch_EEEE.parquet tables for split {split!r}")
    local = lambda name: root / name[len(contract.losses_dir(split)) + 1:]  # noqa: E731
    return [[local(part) for part in epoch] if isinstance(epoch, list) else local(epoch) for epoch in grouped[split]]


def _check_loss_columns(path: Path, expected: list[str]) -> None:
    """Refuse a later epoch whose loss columns differ from epoch 0's (DuckDB would ignore extras)."""
    name = _name(path)
    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as error:
        raise ActionScoresError(f"{name} is not a readable parquet file: {error}") from None
    found = contract.loss_columns(columns)
    if contract.LOSS not in columns or sorted(found) != sorted(expected):
        raise ActionScoresError(f"{name}: loss columns {sorted(c for c in found if c in columns)} differ "
                                f"from epoch 0's {sorted(expected)}")


def _name(path: Path) -> str:
    """How errors name a file: `epoch_0003.parquet`, or a part with its epoch's folder."""
    return f"{path.parent.name}/{path.name}" if contract.parse_part_file_name(path.name) is not None else path.name


def score_folder_duckdb(folder: str | Path, split: str, memory_limit: str | None = None) -> pd.DataFrame:
    """Score the epochs of one split downloaded to `folder` (see `epoch_paths`, `score_tables_duckdb`)."""
    return score_tables_duckdb(epoch_paths(folder, split), split, memory_limit)


def score_tables_duckdb(paths: list[Epoch], split: str, memory_limit: str | None = None) -> pd.DataFrame:
    """Score one split's epochs (in epoch order: a file, or its parts) with one DuckDB query; same columns as
    `ActionAccumulator.compute`.

    `memory_limit` (e.g. "2GB") caps DuckDB's memory; past it the aggregation spills to disk.
    Epoch 0 is read and checked as the default engine checks it (types, duplicates, its parts' union); every
    later file's footer must name the same loss columns, and every sample must
    appear once per epoch: a count that differs from the number of epochs, or a sample
    whose epochs are not each epoch once (`each_epoch_once`, see `action_query`), is an
    error naming the samples, and so are NaN or infinite sums. A sharded epoch keeps each id's first
    occurrence (`sharded_query`).
    """
    import duckdb

    if isinstance(paths[0], list):
        first = union_of_parts([(_name(part), read_part_table(part, _name(part))) for part in paths[0]],
                               paths[0][0].parent.name)
    else:
        first = read_epoch_table(paths[0], paths[0].name)
    loss_columns = contract.loss_columns(first.column_names)
    label = contract.TARGET if contract.TARGET in first.column_names else None
    files = [file for epoch in paths for file in files_of(epoch)]
    for path in files[len(files_of(paths[0])):]:
        _check_loss_columns(path, loss_columns)
    if any(isinstance(epoch, list) for epoch in paths):
        query = sharded_query(loss_columns, label, len(paths), len(files))
        drop_files, drop_rows = later_copies(paths)
        arguments = {"files": [str(p) for p in files], "drop_files": drop_files, "drop_rows": drop_rows,
                     "epoch_of": [epoch for epoch, found in enumerate(paths) for _ in files_of(found)]}
    else:
        query, arguments = action_query(loss_columns, label, len(paths)), {"files": [str(p) for p in files]}
    connection = duckdb.connect(config={"memory_limit": memory_limit} if memory_limit else {})
    try:
        scores = connection.execute(query, arguments).df()
    except duckdb.Error as error:
        raise ActionScoresError(f"split {split!r}: DuckDB could not read the tables {files[0].parent}: {error}") from None
    finally:
        connection.close()
    wrong = scores.loc[(scores["epochs"].to_numpy() != len(paths)) | ~scores.pop("each_epoch_once").to_numpy(bool),
                       contract.SAMPLE_ID]
    if len(wrong):
        raise ActionScoresError(
            f"split {split!r}: samples {preview(wrong)} are not in every one of the {len(paths)} epoch tables "
            "exactly once"
        )
    action_columns = [contract.action_column(column) for column in loss_columns]
    bad = scores.loc[~np.isfinite(scores[action_columns].to_numpy()).all(axis=1), contract.SAMPLE_ID]
    if len(bad):
        raise ActionScoresError(f"split {split!r} has NaN or infinite losses in samples {preview(bad)}")
    scores[contract.SAMPLE_ID] = scores[contract.SAMPLE_ID].astype(np.int64)
    scores["epochs"] = scores["epochs"].astype(np.int64)
    scores["mean_loss"] = scores["action"] / len(paths)
    scores["rank"] = rank(scores, "action")
    ordered = [contract.SAMPLE_ID, "epochs", *action_columns, "mean_loss", "rank"] + (["label"] if label else [])
    return scores[ordered]
