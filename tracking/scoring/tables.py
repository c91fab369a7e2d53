"""Reading the recorded tables back: which files make a split, and one checked epoch table.

Checks run once, here, so that scoring can trust what it sums: the contract's columns
and types, integer ids without repeats, epochs 0..N-1 without a gap. A sharded epoch's parts are
checked one by one and joined into the same sorted table (`union_of_parts`).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview

if TYPE_CHECKING:
    from tracking.backends.base import Tracker

T = TypeVar("T")
Epoch = str | list[str]
"""One epoch of a split as the run holds it: its `epoch_EEEE.parquet`, or the `part-RRRRR.parquet` files of its
folder `epoch_EEEE/`, in part order (one per writing process; their union is the epoch)."""


def files_of(epoch: T | list[T]) -> list[T]:
    """The files that make an epoch (artifact paths, or their local copies): itself, or its parts in part order."""
    return list(epoch) if isinstance(epoch, list) else [epoch]


def epoch_name(epoch: Epoch) -> str:
    """How messages name an epoch: its file, or the folder of its parts."""
    return epoch[0].rsplit("/", 1)[0] if isinstance(epoch, list) else epoch


def epoch_files(files: list[str]) -> dict[str, list[Epoch]]:
    """Group a run's `per_sample_losses/` paths by split into epochs, in epoch order (`Epoch`).

    Epochs must run 0, 1, ..., N-1 without a gap, and a sharded epoch's parts 0, 1, ..., R-1; a split is
    all single files or all sharded epochs; two files for one epoch or one part are refused. Every error
    names the files. Files that are not parquet are ignored; hostile paths are refused
    (`contract.parse_losses_file`).
    """
    singles: dict[str, dict[int, str]] = defaultdict(dict)
    sharded: dict[str, dict[int, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))
    for path in files:
        found = contract.parse_losses_file(path)
        if found is None:
            continue
        if found.part is None:
            seen = singles[found.split]
            if found.epoch in seen:
                raise ActionScoresError(f"split {found.split!r}: two tables for epoch {found.epoch}: "
                                        f"{seen[found.epoch]} and {path}")
            seen[found.epoch] = path
        else:
            seen = sharded[found.split][found.epoch]
            if found.part in seen:
                raise ActionScoresError(f"split {found.split!r}: two tables for part {found.part} of epoch "
                                        f"{found.epoch}: {seen[found.part]} and {path}")
            seen[found.part] = path
    grouped: dict[str, list[Epoch]] = {}
    for split in sorted(set(singles) | set(sharded)):
        if split in singles and split in sharded:
            single_names = sorted(singles[split].values())
            part_names = sorted(p for parts in sharded[split].values() for p in parts.values())
            raise ActionScoresError(
                f"split {split!r} mixes single-file epochs ({_listed(single_names)}) and sharded ones "
                f"({_listed(part_names)}): write every epoch of a split as epoch_EEEE.parquet, or every one as "
                "epoch_EEEE/part-RRRRR.parquet"
            )
        if split in singles:
            epochs = singles[split]
            _refuse_gaps(epochs, contract.epoch_file_name, f"split {split!r}: epoch tables missing", "epochs")
            grouped[split] = [epochs[e] for e in sorted(epochs)]
            continue
        epochs_parts = sharded[split]
        _refuse_gaps(epochs_parts, lambda e, split=split: f"{contract.epoch_parts_dir(split, e)}/",
                     f"split {split!r}: sharded epochs missing", "epochs")
        grouped[split] = []
        for epoch in sorted(epochs_parts):
            parts = epochs_parts[epoch]
            folder = contract.epoch_parts_dir(split, epoch)
            _refuse_gaps(parts, lambda r, folder=folder: f"{folder}/{contract.part_file_name(r)}",
                         f"split {split!r}, epoch {epoch}: parts missing", "parts")
            grouped[split].append([parts[r] for r in sorted(parts)])
    return grouped


def _listed(names: list[str], most: int = 3) -> str:
    """A few names of a long list, and how many more."""
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")


def _refuse_gaps(found: dict[int, object], name: Callable[[int], str], what: str, unit: str) -> None:
    """Refuse numbers that do not run 0..max without a gap, naming the first missing files."""
    last = max(found)
    if len(found) == last + 1:
        return
    # Never materialise 0..last: a file named epoch_99999999.parquet must not cost 100M entries.
    first = list(itertools.islice((n for n in range(last + 1) if n not in found), 10))
    more = last + 1 - len(found) - len(first)
    names = f"[{', '.join(name(n) for n in first)}]" + (f" and {more} more" if more else "")
    raise ActionScoresError(f"{what}: {names} (found {len(found)} of {unit} 0..{last})")


def read_epoch_table(
    path: str | Path | pa.NativeFile, name: str, threads: bool = True, skip: frozenset[str] = frozenset()
) -> pa.Table:
    """Read and check one `epoch_EEEE.parquet` (a file, or a reader over its bytes); `name` is how errors refer to it.

    Checks: readable parquet, a non-empty table, an integer `sample_id` without
    duplicates, float `loss` and `loss_<part>` columns. Returns it sorted by sample_id.
    `skip`: columns not to decode (`ActionAccumulator.unused_columns`); their types are still
    checked, from the file's schema. `threads=False` decodes on the calling thread only, for
    callers that read files in parallel.
    """
    table = read_part_table(path, name, threads, skip)
    if table.num_rows == 0:
        raise ActionScoresError(f"{name} is empty")
    ids = table.column(contract.SAMPLE_ID).to_numpy()
    if not np.all(ids[1:] > ids[:-1]):
        table = table.sort_by(contract.SAMPLE_ID)
        ids = table.column(contract.SAMPLE_ID).to_numpy()
        repeated = np.unique(ids[1:][ids[1:] == ids[:-1]])
        if repeated.size:
            raise ActionScoresError(f"{name}: repeated sample ids {preview(repeated)}")
    return table


def read_part_table(
    path: str | Path | pa.NativeFile, name: str, threads: bool = True, skip: frozenset[str] = frozenset()
) -> pa.Table:
    """Read and check one part of a sharded epoch, rows in the file's order (`union_of_parts` keeps the first
    occurrence of an id by it); the checks of `read_epoch_table` but repeats and emptiness, which are the
    epoch's (a process may have had no share)."""
    try:
        # ParquetFile.read, not read_table: no dataset layer, one chunk per row group (zero-copy numpy).
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            check_schema(schema, name)
            table = parquet.read([column for column in schema.names if column not in skip], use_threads=threads)
    except (pa.ArrowException, OSError) as error:
        raise ActionScoresError(f"{name} is not a readable parquet file: {error}") from None
    if table.column(contract.SAMPLE_ID).null_count:
        raise ActionScoresError(f"{name}: column 'sample_id' has {table.column(contract.SAMPLE_ID).null_count} nulls")
    ids = table.column(contract.SAMPLE_ID).to_numpy()
    if ids.dtype == np.uint64 and ids.size and ids.max() > np.iinfo(np.int64).max:  # would wrap to negative ids
        raise ActionScoresError(f"{name}: sample ids {preview(ids[ids > np.iinfo(np.int64).max])} do not fit in int64")
    return table


def union_of_parts(parts: list[tuple[str, pa.Table]], name: str) -> pa.Table:
    """One sharded epoch from its parts' tables (`read_part_table`, in part order), sorted by sample_id.

    An id in several rows keeps its first occurrence in part order, then row order (a `DistributedSampler`
    pads its last shares with copies of the first samples). The parts must have the first one's columns and
    types; `name` (the epoch's folder) names an epoch without rows.
    """
    first_name, first = parts[0]
    expected = [(field.name, field.type) for field in first.schema]
    for part_name, table in parts[1:]:
        found = [(field.name, field.type) for field in table.schema]
        if found != expected:
            raise ActionScoresError(f"{part_name}: columns {_columns(found)} differ from {first_name}'s "
                                    f"{_columns(expected)}")
    table = pa.concat_tables([table for _, table in parts], promote_options="default")
    if table.num_rows == 0:
        raise ActionScoresError(f"{name} is empty: none of its {len(parts)} parts has a row")
    return table.take(first_occurrences(table.column(contract.SAMPLE_ID).to_numpy()))


def first_occurrences(ids: np.ndarray) -> np.ndarray:
    """Positions of each id's first occurrence in `ids` (parts one after the other), in id order: one stable
    argsort, so equal ids stay in part order, then row order."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    first = np.ones(ids.size, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


def _columns(fields: list[tuple[str, pa.DataType]]) -> str:
    return "[" + ", ".join(f"{column}: {kind}" for column, kind in fields) + "]"


def check_schema(schema: pa.Schema, name: str) -> None:
    """Refuse an epoch table without the contract's columns or with the wrong types."""
    columns = schema.names
    for required in (contract.SAMPLE_ID, contract.LOSS):
        if required not in columns:
            raise ActionScoresError(f"{name} has no {required!r} column (columns: {columns})")
    if not pa.types.is_integer(schema.field(contract.SAMPLE_ID).type):
        raise ActionScoresError(f"{name}: column 'sample_id' must be integer, got {schema.field(contract.SAMPLE_ID).type}")
    try:
        loss_columns = contract.loss_columns(columns)
    except ActionScoresError as error:
        raise ActionScoresError(f"{name}: {error}") from None
    for column in loss_columns:
        if not pa.types.is_floating(schema.field(column).type):
            raise ActionScoresError(f"{name}: column {column!r} must be float, got {schema.field(column).type}")
    recorded_columns(schema, name)


def recorded_columns(schema: pa.Schema, name: str) -> frozenset[str]:
    """Which of the dynamics' source columns a table has, checking their types."""
    found = frozenset(set(contract.RECORDED_COLUMNS) & set(schema.names))
    for column in found:
        kind = schema.field(column).type
        good = pa.types.is_boolean(kind) if column == contract.CORRECT else pa.types.is_floating(kind)
        if not good:
            expected = "bool" if column == contract.CORRECT else "float"
            raise ActionScoresError(f"{name}: column {column!r} must be {expected}, got {kind}")
    return found


def dynamics_expected(columns: list[str]) -> bool:
    """Whether a table whose columns lack some of the dynamics scores' sources is worth a warning.

    Not for a loss in parts (detection's `loss_loc`, `loss_pos`, `loss_neg`) with none of the
    recorded columns: those scores are classification quantities (from the logits of one label), which
    a detector never records, so their absence is expected. Nor for a loss per sequence (a language
    model's, with `tokens`): its labels are tokens, not one class. A classification table without them, or
    with only some (runs recorded before them, a loop without `classification_columns`), still warns.
    """
    not_one_label = len(contract.loss_columns(columns)) > 1 or contract.TOKENS in columns
    return not not_one_label or bool(set(contract.RECORDED_COLUMNS) & set(columns))


def bools(column: pa.ChunkedArray, what: str) -> np.ndarray:
    """A boolean column as numpy, unpacked from Arrow's bitmap by one numpy call (15x `to_numpy`);
    `what` names the column in the error for nulls."""
    if column.null_count:
        raise ActionScoresError(f"{what} has {column.null_count} nulls")
    array = column.combine_chunks()  # one chunk per row group: usually already one, no copy
    bits = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return np.unpackbits(bits, count=array.offset + len(array), bitorder="little")[array.offset:].view(bool)


def scores_files(paths: list[str]) -> dict[str, list[str]]:
    """Split -> the artifact paths of its scores among a run's `action_scores/` paths: `<split>/scores.parquet`,
    or the parts `<split>/scores/part-RRRRR.parquet` in part order (`--engine spark` above a size). Parts with a
    gap, or a split with both forms, are refused, naming the files."""
    single, parts = {}, defaultdict(dict)
    for path in paths:
        pieces = path.split("/")
        if len(pieces) == 3 and pieces[0] == contract.SCORES_DIR and pieces[2] == contract.SCORES_FILE:
            single[pieces[1]] = path
        elif (len(pieces) == 4 and pieces[0] == contract.SCORES_DIR and pieces[2] == contract.SCORES_PARTS_DIR
              and (number := _part_number(pieces[3])) is not None):
            parts[pieces[1]][number] = path
    both = sorted(set(single) & set(parts))
    if both:
        split = both[0]
        raise ActionScoresError(f"split {split!r} has its scores twice: {single[split]} and "
                                f"{contract.scores_dir(split)}/{contract.SCORES_PARTS_DIR}/; delete the older form")
    found = {split: [path] for split, path in single.items()}
    for split, numbered in parts.items():
        folder = f"{contract.scores_dir(split)}/{contract.SCORES_PARTS_DIR}"
        _refuse_gaps(numbered, lambda r, folder=folder: f"{folder}/{contract.part_file_name(r)}",
                     f"split {split!r}: scores parts missing", "parts")
        found[split] = [numbered[r] for r in sorted(numbered)]
    return dict(sorted(found.items()))


def _part_number(name: str) -> int | None:
    """R of `part-RRRRR.parquet` written exactly as `contract.part_file_name(R)` names it, None otherwise."""
    number = contract.parse_part_file_name(name)
    return number if number is not None and contract.part_file_name(number) == name else None


def read_scores(tracker: Tracker, split: str, work: Path, columns: list[str] | None = None) -> pa.Table:
    """A split's scores from the attached run, in either form (`scores_files`): the single file, or its parts
    concatenated in part order (ranges of sample ids, so sorted as the single file). `columns`: only those;
    a column the scores lack is an error naming their columns, raised before any part but the first is read."""
    paths = scores_files(tracker.list_files(contract.scores_dir(split))).get(split)
    if not paths:
        raise ActionScoresError(f"the run has no {contract.scores_dir(split)}/{contract.SCORES_FILE} (nor "
                                f"{contract.SCORES_PARTS_DIR}/part-RRRRR.parquet): run `action-scores analyze` on it")
    tables = []
    for path in paths:
        local = tracker.download(path, work)
        if columns is not None and not tables:
            names = pq.read_schema(local).names
            if lacking := [column for column in columns if column not in names]:
                raise ScoresColumnMissing(f"{paths[0]} has no {lacking[0]!r} (its columns: {names})", names)
        tables.append(pq.read_table(local, columns=columns))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


class ScoresColumnMissing(ActionScoresError):
    """`read_scores` was asked for a column the scores lack; `columns` are the ones they have."""

    def __init__(self, message: str, columns: list[str]) -> None:
        super().__init__(message)
        self.columns = columns
