"""Hostile and broken input the other tests leave out: paths that climb out of the download folder,
pickles (never unpickled), and run-level tables that are wrong in ways a writer could get wrong.
Each is a clear ActionScoresError naming the problem, and the run is left exactly as it was."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import mlflow
import pyarrow as pa
import pytest
import torch

from tests.conftest import ROOT
from tests.test_analyze_errors import _files_with, _good_files, _make_run, _table, assert_refused_and_unchanged
from tracking.analyze import epoch_files
from tracking.errors import ActionScoresError
from tracking.trackers import MLflowTracker


class Payload:
    """Pickled, it would create `marker` when unpickled: the proof that nothing is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (str(self.marker),)


ESCAPING = [
    "per_sample_losses/../../../etc/epoch_0000.parquet",
    "per_sample_losses/test/../../../../tmp/epoch_0000.parquet",
    "/per_sample_losses/test/epoch_0000.parquet",
    "/etc/passwd",
    "per_sample_losses\\..\\..\\epoch_0000.parquet",
    "C:\\per_sample_losses\\test\\epoch_0000.parquet",
]


@pytest.mark.parametrize("path", ESCAPING)
def test_artifact_paths_that_escape_the_download_folder_are_refused(
    path: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    message = rf"artifact path {re.escape(repr(path))} escapes the run's artifact folder"
    with pytest.raises(ActionScoresError, match=message):
        epoch_files(["per_sample_losses/test/epoch_0000.parquet", path])  # as a server could list them
    # And the download itself refuses, whatever the caller: nothing is written anywhere.
    run_id = _make_run(client, experiment_id, tmp_path / "made", _good_files(epochs=1))
    tracker.attach(run_id)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ActionScoresError, match=message):
        tracker.download(path, tmp_path / "dst" / "in")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_checkpoint_with_pickled_objects_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    from experiments.models import ssd300

    marker = tmp_path / "unpickled"
    checkpoint = tmp_path / "weights.pt"
    torch.save({"features.0.weight": torch.zeros(1), "extra": Payload(marker)}, checkpoint)
    with pytest.raises(ActionScoresError, match=rf"{re.escape(str(checkpoint))} is not a plain state dict: it holds "
                                                r"objects that only unpickling arbitrary code could rebuild"):
        ssd300(num_classes=3, weights=str(checkpoint))
    assert not marker.exists()


def test_no_code_path_unpickles() -> None:
    """Every torch.load passes weights_only=True; no pickle, numpy pickle or pandas pickle reader is used."""
    sources = [p for folder in ("tracking", "experiments", "bench") for p in (ROOT / folder).rglob("*.py")]
    offending = []
    for source in sources:
        text = source.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offending.append(f"{source.name}: {call}")
        for unsafe in ("pickle.load", "pickle.loads", "read_pickle", "allow_pickle=True", "dill", "joblib.load"):
            if unsafe in text:
                offending.append(f"{source.name}: {unsafe}")
    assert len(sources) > 10 and offending == []


def _pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


BROKEN = {
    "sample ids as strings": (
        lambda tmp: _files_with(epoch_0001=pa.table({"sample_id": [str(i) for i in range(6)], "loss": [1.0] * 6})),
        r"per_sample_losses/test/epoch_0001\.parquet: column 'sample_id' must be integer, got string",
    ),
    "losses as integers": (
        lambda tmp: _files_with(epoch_0002=pa.table({"sample_id": list(range(6)), "loss": list(range(6))})),
        r"per_sample_losses/test/epoch_0002\.parquet: column 'loss' must be float, got int64",
    ),
    "duplicate ids": (
        lambda tmp: _files_with(epoch_0001=_table([0, 1, 2, 3, 3, 5], [1.0] * 6)),
        r"per_sample_losses/test/epoch_0001\.parquet: repeated sample ids \[3\]",
    ),
    "empty table": (
        lambda tmp: _files_with(epoch_0000=_table([], [])),
        r"per_sample_losses/test/epoch_0000\.parquet is empty",
    ),
    "negative epoch in the file name": (
        lambda tmp: _files_with(**{"epoch_-0001": _table(list(range(6)), [1.0] * 6)}),
        r"per_sample_losses/test/epoch_-0001\.parquet: not named epoch_EEEE\.parquet",
    ),
    "a pickle named .parquet": (
        lambda tmp: _files_with(epoch_0001=_pickle_bytes(tmp / "unpickled")),
        r"per_sample_losses/test/epoch_0001\.parquet is not a readable parquet file",
    ),
    "a CSV named .parquet": (
        lambda tmp: _files_with(epoch_0002=b"sample_id,loss\n0,1.0\n1,2.0\n"),
        r"per_sample_losses/test/epoch_0002\.parquet is not a readable parquet file",
    ),
    "a huge epoch number": (
        lambda tmp: {"per_sample_losses/test/epoch_99999999.parquet": _table(list(range(6)), [1.0] * 6)},
        r"split 'test': epoch tables missing: \[epoch_0000\.parquet, .*, epoch_0009\.parquet\] and 99999989 more "
        r"\(found 1 of epochs 0\.\.99999999\)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_tables_on_a_run_are_refused_and_the_run_left_unchanged(
    case: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path
) -> None:
    make, message = BROKEN[case]
    run_id = _make_run(client, experiment_id, tmp_path, make(tmp_path))
    assert_refused_and_unchanged(client, tracker, run_id, message)
    assert not (tmp_path / "unpickled").exists()
