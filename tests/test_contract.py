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
    assert contract.parse_losses_file("per_sample_losses/train/epoch_0000.parquet") == contract.LossesFile(
        "per_sample_losses/train/epoch_0000.parquet", "train", 0)
    for path in ("/etc/passwd", "per_sample_losses/../../x", "C:\\x", "\\\\host\\share",
                 "per_sample_losses/train/epoch_0000/../../../part-00000.parquet",
                 "/per_sample_losses/train/epoch_0000/part-00000.parquet"):
        with pytest.raises(ActionScoresError, match="escapes the run's artifact folder"):
            contract.parse_losses_file(path)
    for path in ("action_scores/train/scores.parquet", "per_sample_losses/epoch_0000.parquet",
                 "per_sample_losses/train/epoch_0000/0/part-00000.parquet"):
        with pytest.raises(ActionScoresError, match=r"is not of the form per_sample_losses/<split>/epoch_EEEE\.parquet "
                                                    r"or per_sample_losses/<split>/epoch_EEEE/part-RRRRR\.parquet"):
            contract.parse_losses_file(path)


def test_parts_of_a_sharded_epoch_round_trip_and_bad_names_are_refused() -> None:
    folder = contract.epoch_parts_dir("train", 3)
    assert folder == "per_sample_losses/train/epoch_0003"
    assert contract.part_file_name(12) == "part-00012.parquet"
    assert contract.parse_losses_file(f"{folder}/{contract.part_file_name(12)}") == contract.LossesFile(
        f"{folder}/part-00012.parquet", "train", 3, 12)
    assert [contract.parse_part_file_name(n) for n in ("part-00012.parquet", "part-123456.parquet", "part-1.parquet",
                                                       "part-00001.csv")] == [12, 123456, None, None]
    assert contract.parse_losses_file(f"{folder}/_SUCCESS") is None  # a writer's marker: no table
    assert contract.parse_losses_file("per_sample_losses/train/notes.txt") is None
    with pytest.raises(ActionScoresError, match=r"epoch_0003/part-1\.parquet: a part of a sharded epoch is named "
                                                r"part-RRRRR\.parquet"):
        contract.parse_losses_file(f"{folder}/part-1.parquet")
    with pytest.raises(ActionScoresError, match=r"the folder of a sharded epoch is named epoch_EEEE .*not 'epoch_3'"):
        contract.parse_losses_file("per_sample_losses/train/epoch_3/part-00000.parquet")
    with pytest.raises(ActionScoresError, match=r"split name '\.x' is not allowed"):
        contract.parse_losses_file("per_sample_losses/.x/epoch_0000/part-00000.parquet")
    with pytest.raises(ActionScoresError, match="part must be >= 0, got -1"):
        contract.part_file_name(-1)
