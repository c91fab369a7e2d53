"""The scoring engines on real parquet files: a table given as a file or as a reader that waits for it gives
the same scores, the numpy sums; `done` is called once per epoch; duckdb refuses tables in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracking import contract
from tracking.scoring.engines import ENGINES, score_split, table_source

EPOCHS, SAMPLES = 4, 25


def _files(tmp_path: Path) -> tuple[list[Path], np.ndarray]:
    losses = np.random.default_rng(5).exponential(1.0, (EPOCHS, SAMPLES)).astype(np.float32)
    paths = []
    for epoch, row in enumerate(losses):
        order = np.random.default_rng(epoch).permutation(SAMPLES)
        path = tmp_path / contract.epoch_file_name(epoch)
        pq.write_table(pa.table({"sample_id": pa.array(order, pa.int64()), "loss": pa.array(row[order])}), path)
        paths.append(path)
    return paths, losses.astype(np.float64)


def test_a_file_and_a_reader_of_it_score_the_same_numpy_sums(tmp_path: Path) -> None:
    paths, losses = _files(tmp_path)
    done: list[int] = []
    from_files = score_split("train", [(p.name, p) for p in paths], done=done.append, progress=False)
    readers = [(p.name, lambda p=p: pa.BufferReader(p.read_bytes())) for p in paths]
    from_readers = score_split("train", readers, progress=False)
    assert sorted(done) == list(range(EPOCHS))
    assert from_files.equals(from_readers)
    scores = from_files.set_index("sample_id").sort_index()
    np.testing.assert_allclose(scores["action"].to_numpy(), losses.sum(axis=0), rtol=1e-12)
    assert scores["rank"].to_numpy()[np.argmax(losses.sum(axis=0))] == 1
    assert (scores["epochs"] == EPOCHS).all()


def test_table_source_waits_on_a_reader_and_passes_a_file_through(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    assert table_source(path) is path
    assert table_source(lambda: path) is path


def test_duckdb_reads_files_only(tmp_path: Path) -> None:
    paths, losses = _files(tmp_path)
    scores = ENGINES["duckdb"].score("train", [(p.name, p) for p in paths], None, None, False)
    np.testing.assert_allclose(scores.set_index("sample_id").sort_index()["action"].to_numpy(), losses.sum(axis=0),
                               rtol=1e-12)
    with pytest.raises(TypeError, match="the duckdb engine reads files on disk, not tables in memory"):
        ENGINES["duckdb"].score("train", [(p.name, lambda p=p: pa.BufferReader(p.read_bytes())) for p in paths],
                                None, None, False)
    assert (ENGINES["arrow"].streams, ENGINES["duckdb"].streams) == (True, False)
