"""The file contract's names and paths: what is accepted, what is refused and with which message."""

from __future__ import annotations

import pytest

from tracking import contract
from tracking.errors import ActionScoresError


def test_epoch_file_names_round_trip_and_other_names_are_none() -> None:
    assert contract.epoch_file_name(3) == "epoch_0003.parquet"
    assert contract.epoch_file_name(12345) == "epoch_12345.parquet"
    assert [contract.parse_epoch_file_name(n) for n in
            ("epoch_0003.parquet", "epoch_12345.parquet", "epoch_3.parquet", "epoch_0003.csv", "media.parquet")
            ] == [3, 12345, None, None, None]
    with pytest.raises(ActionScoresError, match="epoch must be >= 0, got -1"):
        contract.epoch_file_name(-1)


def test_split_and_part_names_become_one_safe_path_component() -> None:
    assert contract.losses_dir("train") == "per_sample_losses/train"
    assert contract.scores_dir("val.1") == "action_scores/val.1"
    assert contract.part_column("loc") == "loss_loc"
    for bad in ("../x", "a/b", "", ".hidden", "-x"):
        with pytest.raises(ActionScoresError, match=f"split name {bad!r} is not allowed"):
            contract.media_dir(bad)


def test_loss_columns_and_their_scores_keep_the_table_s_order() -> None:
    columns = ["sample_id", "loss_neg", "loss", "correct", "loss_loc"]
    assert contract.parts_of(columns) == ["neg", "loc"]
    assert contract.loss_columns(columns) == ["loss", "loss_neg", "loss_loc"]
    assert [contract.action_column(c) for c in contract.loss_columns(columns)] == ["action", "action_neg", "action_loc"]


def test_artifact_paths_that_leave_the_run_are_refused() -> None:
    assert contract.split_of_artifact("per_sample_losses/train/epoch_0000.parquet") == ("train", "epoch_0000.parquet")
    for path in ("/etc/passwd", "per_sample_losses/../../x", "C:\\x", "\\\\host\\share"):
        with pytest.raises(ActionScoresError, match="escapes the run's artifact folder"):
            contract.split_of_artifact(path)
    with pytest.raises(ActionScoresError, match=r"is not of the form per_sample_losses/<split>/<file>"):
        contract.split_of_artifact("action_scores/train/scores.parquet")
