"""`--engine spark` on runs of the test session's real MLflow server, on one `local[2]` Spark session: every score
equals the arrow engine's (counts and forgetting exactly, floats within 1e-9 relative) on single-file and sharded
runs, the panels show the same ids, a sample missing from an epoch is named, and a missing Java says what to
install."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from tests.conftest import ROOT, run_command
from tests.test_analyze import _make_run
from tests.test_sharded import SAMPLES, SPLIT, _picture, _runs_data, _scores
from tracking import contract
from tracking.analyze import analyze_run
from tracking.backends import MLflowTracker
from tracking.cli import main
from tracking.errors import ActionScoresError
from tracking.job import CLASS_DISTRIBUTION
from tracking.report.panels import read_panel_rows
from tracking.scoring import registry
from tracking.scoring.registry import SCORES, Score, arrow_only
from tracking.scoring.spark_engine import AGGREGATIONS, JAVA_HELP

pytest.importorskip("pyspark")

EXACT = ["sample_id", "epochs", "forgetting", "rank", "label", "region"]  # ids, counts, labels: equal exactly


@pytest.fixture(scope="session", autouse=True)
def spark() -> Iterator[object]:
    """One local[2] session for these tests (the engine finds it active), stopped at the end."""
    from pyspark.sql import SparkSession

    started = time.perf_counter()
    session = (SparkSession.builder.master("local[2]").appName("action-scores-tests")
               .config("spark.sql.shuffle.partitions", "2").config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    print(f"spark session started in {time.perf_counter() - started:.1f} s")
    yield session
    session.stop()


def _assert_same_scores(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got.columns) == list(expected.columns)
    assert got.dtypes.to_dict() == expected.dtypes.to_dict()
    exact = [c for c in got.columns if c in EXACT]
    pd.testing.assert_frame_equal(got[exact], expected[exact], check_exact=True)
    floats = [c for c in got.columns if c not in EXACT]
    pd.testing.assert_frame_equal(got[floats], expected[floats], check_exact=False, rtol=1e-9, atol=0)


@pytest.mark.parametrize("form", ["single", "sharded"])
def test_spark_scores_and_panels_equal_the_arrow_engine_s(
        form: str, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    sharded, single, truth = _runs_data(seed=11)
    files = sharded if form == "sharded" else single
    runs = {engine: _make_run(client, experiment_id, tmp_path / "made", files) for engine in ("arrow", "spark")}
    seconds, panels = {}, {}
    for engine, run_id in runs.items():
        started = time.perf_counter()
        result = analyze_run(tracker, run_id, top_k=3, pictures=_picture, engine=engine, progress=False)
        seconds[engine] = time.perf_counter() - started
        assert result.status == "done" and result.samples == {SPLIT: SAMPLES}
        panels[engine] = {panel: [row["sample_ids"] for row in read_panel_rows(
            client.download_artifacts(run_id, panel, str(tmp_path / engine)))] for panel in result.panels
            if not panel.endswith((contract.DATA_MAP_FILE, CLASS_DISTRIBUTION))}  # plots, not panels of samples
    print(f"{form}: {SAMPLES} samples x {len(truth)} epochs, job with panels: arrow {seconds['arrow']:.2f} s, "
          f"spark {seconds['spark']:.2f} s")
    got, expected = _scores(client, runs["spark"], tmp_path), _scores(client, runs["arrow"], tmp_path)
    assert {"aum", "forgetting", "confidence", "variability", "correctness", "el2n", "region", "action_loc"} <= set(got)
    _assert_same_scores(got, expected)
    floats = [c for c in got if c not in EXACT]
    worst = max(float(np.max(np.abs(got[c] - expected[c]) / np.abs(expected[c]).clip(1e-300))) for c in floats)
    print(f"{form}: spark == arrow on {list(got.columns)}: {[c for c in EXACT if c in got]} exactly, "
          f"{floats} within {worst:.1e} relative")
    # Not trivially equal: forgetting from the first rows only (the padded copies flip `correct`).
    correct = np.stack([columns["correct"] for columns in truth])
    forgotten = (correct[:-1] & ~correct[1:]).sum(axis=0)
    assert got["forgetting"].tolist() == np.where(correct.any(axis=0), forgotten, len(truth)).tolist()
    # The panels show the same ids, row by row, for every score.
    assert f"{contract.scores_dir(SPLIT)}/forgetting/hardest.png" in panels["spark"]
    assert panels["spark"] == panels["arrow"]
    print(f"{form}: {len(panels['spark'])} panels, the same ids in each")


def test_a_sample_missing_from_an_epoch_or_repeated_in_one_table_is_named(
        client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str, tmp_path: Path) -> None:
    sharded, _, _ = _runs_data(seed=13)
    path = f"{contract.epoch_parts_dir(SPLIT, 1)}/{contract.part_file_name(0)}"
    part = sharded[path]
    lost = part.column("sample_id")[0].as_py()
    run_id = _make_run(client, experiment_id, tmp_path / "made", sharded | {path: part.slice(1)})
    with pytest.raises(ActionScoresError, match=rf"^split 'test': samples \[{lost}\] are not in every epoch: "
                                                rf"{lost} missing from per_sample_losses/test/epoch_0001/$"):
        analyze_run(tracker, run_id, panels=False, engine="spark", progress=False)
    # An id twice in a single-file epoch is refused, naming the table (a sharded epoch keeps the first).
    _, single, _ = _runs_data(seed=13)
    path = f"{contract.losses_dir(SPLIT)}/{contract.epoch_file_name(2)}"
    twice = pa.concat_tables([single[path], single[path].slice(5, 1)])
    run_id = _make_run(client, experiment_id, tmp_path / "made", single | {path: twice})
    repeated = single[path].column("sample_id")[5].as_py()
    with pytest.raises(ActionScoresError, match=rf"^split 'test': repeated sample ids \[{repeated}\] in {path}$"):
        analyze_run(tracker, run_id, panels=False, engine="spark", progress=False)


def test_every_score_spark_computes_has_its_aggregation_and_arrow_only_ones_are_listed() -> None:
    assert set(AGGREGATIONS) == {score.name for score in SCORES.values() if score.spark}
    assert arrow_only() == []
    marked = {**SCORES, "custom": Score("custom", ("loss",), registry.ACTION_INIT, registry.ACTION_UPDATE,
                                        lambda state, epochs: state["total"], higher_is_harder=True,
                                        definition="a test score", paper="none", spark=False)}
    assert arrow_only(marked) == ["custom"]


def test_without_java_the_spark_engine_says_to_install_java_17(
        tracking_env: dict[str, str], client: mlflow.MlflowClient, experiment_id: str, tmp_path: Path) -> None:
    _, single, _ = _runs_data(seed=14)
    run_id = _make_run(client, experiment_id, tmp_path / "made", single)
    env = {key: value for key, value in tracking_env.items() if key != "JAVA_HOME"} | {"PATH": ""}
    result = run_command([sys.executable, "-m", "tracking.cli", "analyze", "--engine", "spark", "--run-id", run_id,
                          "--no-panels"], env, cwd=ROOT, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().endswith(f"action-scores: error: {JAVA_HELP}")
    assert "Java 17" in JAVA_HELP and "openjdk-17-jre-headless" in JAVA_HELP


def test_spark_master_goes_with_the_spark_engine_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--run-id", "any", "--spark-master", "local[1]"]) == 2
    assert capsys.readouterr().err.strip() == "action-scores: error: --spark-master applies to --engine spark only"
