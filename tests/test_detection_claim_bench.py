"""The detection-claim bench's per-epoch correlations (read from a real run's epoch tables on the
session's MLflow server) and its bootstrap interval."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tracking.backends import MLflowTracker
from tracking.record.recorder import LossRecorder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detection_claim():
    sys.path.insert(0, str(ROOT / "bench"))
    import detection_claim

    return detection_claim


def test_each_epochs_own_loss_is_ranked_against_the_annotations(detection_claim, mlflow_server: str,
                                                                tmp_path: Path) -> None:
    count = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    size = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    writer = MLflowTracker(mlflow_server)
    run_id = writer.start(experiment=f"claim-{uuid.uuid4().hex[:8]}")
    recorder = LossRecorder("val", num_samples=6, tracker=writer, local_dir=tmp_path / "tables")
    # Epoch 1: localisation grows with the object count; epoch 2 (the model learned): it falls with it.
    for epoch, loc in enumerate([count, 10.0 - count]):
        recorder.update(np.arange(6), {"loc": torch.tensor(loc), "pos": torch.tensor(size),
                                       "neg": torch.tensor(1.0 - size)})
        recorder.end_epoch(epoch)
    writer.finish()

    reader = MLflowTracker(mlflow_server)
    reader.attach(run_id)
    scores = pd.DataFrame({"sample_id": range(6), "num_objects": count, "median_box_size": size})
    by_epoch = detection_claim.rho_by_epoch(reader, "val", scores, tmp_path / "read").set_index(["epoch", "action"])

    assert sorted(by_epoch.index.get_level_values("epoch").unique()) == [1, 2]
    assert by_epoch.at[(1, "action_loc"), "num_objects"] == pytest.approx(1.0)
    assert by_epoch.at[(2, "action_loc"), "num_objects"] == pytest.approx(-1.0)
    for epoch in (1, 2):
        assert by_epoch.at[(epoch, "action_pos"), "median_box_size"] == pytest.approx(1.0)
        assert by_epoch.at[(epoch, "action_neg"), "median_box_size"] == pytest.approx(-1.0)
    # The total is loc + pos + neg = loc + 1: it ranks as loc does.
    assert by_epoch.at[(2, "action"), "num_objects"] == pytest.approx(-1.0)

    rows = detection_claim.epoch_table(by_epoch.reset_index(), {1: 0.01, 2: 0.02}, "val")
    assert rows[-2:] == ["| 1 | 0.010 | +1.00, -0.26 | -0.26, +1.00 | +0.26, -1.00 | +1.00, -0.26 |",
                         "| 2 | 0.020 | -1.00, +0.26 | -0.26, +1.00 | +0.26, -1.00 | -1.00, +0.26 |"]
    png = detection_claim.plot_rho_by_epoch(by_epoch.reset_index(), {1: 0.01, 2: 0.02}, "val",
                                            tmp_path / "rho.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_bootstrap_interval_holds_the_estimate_and_narrows_with_a_tighter_link(detection_claim) -> None:
    from scipy.stats import spearmanr

    generator = np.random.default_rng(1)
    x = generator.normal(size=300)
    loose, tight = x + 2.0 * generator.normal(size=300), x + 0.2 * generator.normal(size=300)
    low, high = detection_claim.rank_correlation_interval(x, loose)
    assert low < spearmanr(x, loose).statistic < high
    tight_low, tight_high = detection_claim.rank_correlation_interval(x, tight)
    assert tight_low < spearmanr(x, tight).statistic < tight_high
    assert tight_high - tight_low < (high - low) / 2
    assert detection_claim.rank_correlation_interval(x, 3.0 * x) == (pytest.approx(1.0), pytest.approx(1.0))
