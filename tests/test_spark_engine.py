"""`--engine spark` on runs of the test session's real MLflow server, on one `local[2]` Spark session: every score
equals the arrow engine's (counts and forgetting exactly, floats within 1e-9 relative) on single-file and sharded
runs, the panels show the same ids from the top-k rows alone, scores written in parts read back by `select` and
`compare` as the single file, a sample missing from an epoch is named, and a missing Java says what to install."""

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
from tracking.compare import compare_runs
from tracking.backends import MLflowTracker
from tracking.cli import main
from tracking.errors import ActionScoresError
from tracking.job import CLASS_DISTRIBUTION
from tracking.record.media import record_media
from tracking.report.panels import read_panel_rows
from tracking.scoring import registry
from tracking.scoring.registry import SCORES, Score, arrow_only
from tracking.scoring.spark_engine import AGGREGATIONS, JAVA_HELP, PARTS_ABOVE_CONF
from tracking.scoring.tables import read_scores, scores_files
from tracking.selection import select_run

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
        form: str, spark: object, client: mlflow.MlflowClient, tracker: MLflowTracker, experiment_id: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sharded, single, truth = _runs_data(seed=11)
    files = sharded if form == "sharded" else single | {f"{contract.media_dir(SPLIT)}/{contract.MEDIA_FILE}":
                                                         _class_media(single, tmp_path)}
    runs = {engine: _make_run(client, experiment_id, tmp_path / "made", files) for engine in ("arrow", "spark")}
    if form == "sharded":  # the scores of the sharded run in parts of at most 15 rows: 40 samples, 3 parts
        spark.conf.set(PARTS_ABOVE_CONF, "15")
    seconds, panels = {}, {}
    try:
        for engine, run_id in runs.items():
            collected = _driver_rows(monkeypatch, type(spark.range(0))) if engine == "spark" else None
            started = time.perf_counter()
            result = analyze_run(tracker, run_id, top_k=3, pictures=_picture, engine=engine, progress=False)
            seconds[engine] = time.perf_counter() - started
            assert result.status == "done" and result.samples == {SPLIT: SAMPLES}
            panels[engine] = {panel: [row["sample_ids"] for row in read_panel_rows(
                client.download_artifacts(run_id, panel, str(tmp_path / engine)))] for panel in result.panels
                if not panel.endswith((contract.DATA_MAP_FILE, CLASS_DISTRIBUTION))}  # plots of every sample
    finally:
        spark.conf.unset(PARTS_ABOVE_CONF)
    print(f"{form}: {SAMPLES} samples x {len(truth)} epochs, job with panels: arrow {seconds['arrow']:.2f} s, "
          f"spark {seconds['spark']:.2f} s")
    # Only the panels' rows came to the driver as rows of scores; every other result was a few rows of counts.
    shown = {sample for rows in panels["arrow"].values() for ids in rows for sample in ids}
    assert {sample for frame in collected["toPandas"] for sample in frame.get(contract.SAMPLE_ID, [])} == shown
    assert max(len(rows) for rows in collected["collect"]) <= 4 < len(shown)
    tracker.attach(runs["spark"])
    written = scores_files(tracker.list_files(contract.SCORES_DIR))[SPLIT]
    folder = contract.scores_dir(SPLIT)
    expected_files = ([f"{folder}/{contract.SCORES_PARTS_DIR}/{contract.part_file_name(r)}" for r in range(3)]
                      if form == "sharded" else [f"{folder}/{contract.SCORES_FILE}"])
    assert written == expected_files
    assert not [p for p in tracker.list_files(contract.scores_dir(SPLIT)) if "_SUCCESS" in p or p.endswith(".crc")]
    got, expected = _read(tracker, runs["spark"], tmp_path), _read(tracker, runs["arrow"], tmp_path)
    assert {"aum", "forgetting", "confidence", "variability", "correctness", "el2n", "region", "action_loc"} <= set(got)
    _assert_same_scores(got, expected)
    floats = [c for c in got if c not in EXACT]
    worst = max(float(np.max(np.abs(got[c] - expected[c]) / np.abs(expected[c]).clip(1e-300))) for c in floats)
    print(f"{form}: spark == arrow on {list(got.columns)}: {[c for c in EXACT if c in got]} exactly, "
          f"{floats} within {worst:.1e} relative; spark's scores in {len(written)} file(s)")
    metrics = {engine: {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("action_scores.")}
               for engine, run_id in runs.items()}
    assert metrics["spark"].keys() == metrics["arrow"].keys() and len(metrics["spark"]) == 5
    assert metrics["spark"] == pytest.approx(metrics["arrow"], rel=1e-12, abs=0)
    # Not trivially equal: forgetting from the first rows only (the padded copies flip `correct`).
    correct = np.stack([columns["correct"] for columns in truth])
    forgotten = (correct[:-1] & ~correct[1:]).sum(axis=0)
    assert got["forgetting"].tolist() == np.where(correct.any(axis=0), forgotten, len(truth)).tolist()
    # The panels show the same ids, row by row, for every score; the plots of every sample are arrow's alone.
    assert f"{contract.scores_dir(SPLIT)}/forgetting/hardest.png" in panels["spark"]
    if form == "single":  # per class, from each class's top-k in Spark
        assert len([p for p in panels["spark"] if f"{contract.scores_dir(SPLIT)}/loc/by_class/" in p]) == 4
    assert panels["spark"] == panels["arrow"]
    print(f"{form}: {len(panels['spark'])} panels, the same ids in each")
    if form == "sharded":  # select and compare read the parts as the single file
        _assert_parts_read_as_the_single_file(tracker, runs)


def _class_media(single: dict[str, pa.Table], tmp_path: Path) -> bytes:
    """A media table naming each sample's recorded class: its panels get per-class panels (`by_class/`)."""
    first = single[f"{contract.losses_dir(SPLIT)}/{contract.epoch_file_name(0)}"]
    ids, targets = first.column("sample_id").to_numpy(), first.column("target").to_numpy()
    summary = record_media(None, SPLIT, ids, labels=[f"class {t}" for t in targets],
                           texts=[f"sample {i}" for i in ids], local_dir=tmp_path / "media")
    return summary.path.read_bytes()


def _read(tracker: MLflowTracker, run_id: str, tmp_path: Path) -> pd.DataFrame:
    tracker.attach(run_id)
    return read_scores(tracker, SPLIT, tmp_path / "read" / run_id).to_pandas()


def _driver_rows(monkeypatch: pytest.MonkeyPatch, DataFrame: type) -> dict[str, list]:  # noqa: N803
    """What every `toPandas` (frames) and `collect` (lists of rows) of the session's `DataFrame` class brings to
    the driver from now on."""
    seen: dict[str, list] = {"toPandas": [], "collect": []}
    for name in seen:
        def recording(self: object, original=getattr(DataFrame, name), name: str = name) -> object:  # noqa: ANN001
            result = original(self)
            seen[name].append(result)
            return result

        monkeypatch.setattr(DataFrame, name, recording)
    return seen


def _assert_parts_read_as_the_single_file(tracker: MLflowTracker, runs: dict[str, str]) -> None:
    """`select` and `compare` on arrow's single file and spark's parts of the same data: the same selection and
    the same ranks."""
    chosen = {engine: select_run(tracker, run_id, by="action", fraction=0.25).table for engine, run_id in runs.items()}
    assert len(chosen["spark"]) == SAMPLES // 4
    pd.testing.assert_frame_equal(chosen["spark"][[contract.SAMPLE_ID, "rank", "label", "suggested_label"]],
                                  chosen["arrow"][[contract.SAMPLE_ID, "rank", "label", "suggested_label"]])
    compared = compare_runs(tracker, [runs["arrow"], runs["spark"]], top_k=5, score="forgetting")
    assert len(compared.combined) == SAMPLES
    assert compared.combined[f"rank_{runs['arrow']}"].tolist() == compared.combined[f"rank_{runs['spark']}"].tolist()
    assert compared.overlap.to_numpy().tolist() == [[1.0, 1.0], [1.0, 1.0]]
    print(f"parts read back: select {len(chosen['spark'])} samples and compare's ranks equal the single file's")


def test_scores_files_take_one_form_per_split_with_parts_in_order() -> None:
    folder = f"{contract.scores_dir('train')}/{contract.SCORES_PARTS_DIR}"
    parts = [f"{folder}/{contract.part_file_name(r)}" for r in (1, 0)]
    single = f"{contract.scores_dir('val')}/{contract.SCORES_FILE}"
    noise = [f"{folder}/part-1.parquet", f"{folder}/_SUCCESS", f"{contract.scores_dir('val')}/loss/hardest.png"]
    assert scores_files([*parts, single, *noise]) == {"train": parts[::-1], "val": [single]}
    gap = [f"{folder}/{contract.part_file_name(r)}" for r in (0, 2)]
    with pytest.raises(ActionScoresError, match=r"^split 'train': scores parts missing: \[action_scores/train/scores/"
                                                r"part-00001.parquet\] \(found 2 of parts 0..2\)$"):
        scores_files(gap)
    with pytest.raises(ActionScoresError, match="^split 'train' has its scores twice: action_scores/train/scores.pa"):
        scores_files([*parts, f"{contract.scores_dir('train')}/{contract.SCORES_FILE}"])


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
