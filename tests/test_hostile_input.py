"""Hostile input: paths that climb out of the download folder, and pickles, which are never
unpickled. Broken tables on a run are cases of `BAD_RUNS` in test_analyze.py.
Each is a clear ActionScoresError naming the problem, and the run is left exactly as it was."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import pytest
import torch

from tests.conftest import ROOT
from tests.test_analyze import Payload, _good_files, _make_run
from tracking.scoring.tables import epoch_files
from tracking.errors import ActionScoresError
from tracking.backends import MLflowTracker

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

