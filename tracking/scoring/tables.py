"""Reading the recorded tables back: which files make a split, and one checked epoch table.

Checks run once, here, so that scoring can trust what it sums: the contract's columns
and types, integer ids without repeats, epochs 0..N-1 without a gap.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tracking import contract
from tracking.errors import ActionScoresError, preview


def epoch_files(files: list[str]) -> dict[str, list[str]]:
    """Group `per_sample_losses/<split>/epoch_EEEE.parquet` paths by split, in epoch order.

    Epochs must run 0, 1, ..., N-1 without a gap; files that are not parquet are ignored.
    """
    by_split: dict[str, dict[int, str]] = defaultdict(dict)
    for path in files:
        split, name = contract.split_of_artifact(path)
        epoch = contract.parse_epoch_file_name(name)
        if epoch is None:
            if name.endswith(".parquet"):
                raise ActionScoresError(f"{path}: not named epoch_EEEE.parquet (zero-based epoch, 4 digits)")
            continue
        if epoch in by_split[split]:
            raise ActionScoresError(f"split {split!r}: two tables for epoch {epoch}: {by_split[split][epoch]} and {path}")
        by_split[split][epoch] = path
    grouped = {}
    for split, epochs in sorted(by_split.items()):
        last = max(epochs)
        if len(epochs) != last + 1:
            # Never materialise 0..last: a file named epoch_99999999.parquet must not cost 100M entries.
            first = list(itertools.islice((e for e in range(last + 1) if e not in epochs), 10))
            more = last + 1 - len(epochs) - len(first)
            names = f"[{', '.join(contract.epoch_file_name(e) for e in first)}]" + (f" and {more} more" if more else "")
            raise ActionScoresError(
                f"split {split!r}: epoch tables missing: {names} (found {len(epochs)} of epochs 0..{last})"
            )
        grouped[split] = [epochs[e] for e in sorted(epochs)]
    return grouped


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
    try:
        # ParquetFile.read, not read_table: no dataset layer, one chunk per row group (zero-copy numpy).
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
            check_schema(schema, name)
            if parquet.metadata.num_rows == 0:
                raise ActionScoresError(f"{name} is empty")
            table = parquet.read([column for column in schema.names if column not in skip], use_threads=threads)
    except (pa.ArrowException, OSError) as error:
        raise ActionScoresError(f"{name} is not a readable parquet file: {error}") from None
    if table.column(contract.SAMPLE_ID).null_count:
        raise ActionScoresError(f"{name}: column 'sample_id' has {table.column(contract.SAMPLE_ID).null_count} nulls")
    ids = table.column(contract.SAMPLE_ID).to_numpy()
    if ids.dtype == np.uint64 and ids.max() > np.iinfo(np.int64).max:  # would wrap to negative ids
        raise ActionScoresError(f"{name}: sample ids {preview(ids[ids > np.iinfo(np.int64).max])} do not fit in int64")
    if not np.all(ids[1:] > ids[:-1]):
        table = table.sort_by(contract.SAMPLE_ID)
        ids = table.column(contract.SAMPLE_ID).to_numpy()
        repeated = np.unique(ids[1:][ids[1:] == ids[:-1]])
        if repeated.size:
            raise ActionScoresError(f"{name}: repeated sample ids {preview(repeated)}")
    return table


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
    a detector never records, so their absence is expected. A classification table without them, or
    with only some (runs recorded before them, a loop without `classification_columns`), still warns.
    """
    has_parts = len(contract.loss_columns(columns)) > 1
    return not has_parts or bool(set(contract.RECORDED_COLUMNS) & set(columns))


def bools(column: pa.ChunkedArray, what: str) -> np.ndarray:
    """A boolean column as numpy, unpacked from Arrow's bitmap by one numpy call (15x `to_numpy`);
    `what` names the column in the error for nulls."""
    if column.null_count:
        raise ActionScoresError(f"{what} has {column.null_count} nulls")
    array = column.combine_chunks()  # one chunk per row group: usually already one, no copy
    bits = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return np.unpackbits(bits, count=array.offset + len(array), bitorder="little")[array.offset:].view(bool)
