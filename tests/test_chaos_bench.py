"""bench/chaos.py's counting on real files: tables on the session server, a spool folder on disk, the report."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import chaos  # noqa: E402


def _table(path: Path, ids: list[int], losses: list[float]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float32())}), path)
    return path


def test_tables_counted_lost_duplicated_and_summed(client, experiment_id, tmp_path):
    run_id = client.create_run(experiment_id).info.run_id
    # epoch 0 whole, epoch 1 with sample 2 twice (and 1 missing), epoch 2 never arrived, epoch 3 beyond the epochs
    for epoch, ids in ((0, [2, 0, 1]), (1, [0, 2, 2]), (3, [0, 1, 2])):
        local = _table(tmp_path / "made" / f"epoch_{epoch:04d}.parquet", ids, [1.0, 2.0, 4.0])
        client.log_artifact(run_id, str(local), "per_sample_losses/test")
    counts, actions = chaos.table_problems(client, run_id, {"test": 3}, 3, tmp_path / "check")
    assert counts == {"expected": 3, "arrived": 1, "lost": 1, "duplicated": 2}
    np.testing.assert_array_equal(actions["test"], [2.0, 4.0, 1.0])
    assert not chaos.complete(client, chaos.Training("loop-00", "keras", "e", tmp_path, run_id), 3)
    assert chaos.job_problems(client, run_id, actions, 3, tmp_path / "check") == [
        "test: no scores (MlflowException)"]
    scores = tmp_path / "scores" / "scores.parquet"
    scores.parent.mkdir()
    pq.write_table(pa.table({"sample_id": [0, 1, 2], "action": [2.0, 4.0, 1.0], "epochs": [2, 2, 2]}), scores)
    client.log_artifact(run_id, str(scores), "action_scores/test")
    assert chaos.job_problems(client, run_id, actions, 3, tmp_path / "check2") == ["test: scored [2] epochs, not 3"]


def test_queued_tables_of_a_spool(tmp_path):
    spool = tmp_path / "mlflow-abc"
    table = _table(spool / "per_sample_losses" / "test" / "epoch_0001.parquet", [0, 1], [1.0, 2.0])
    media = spool / "per_sample_media" / "test" / "media.parquet"
    _table(media, [0, 1], [0.0, 0.0])
    (spool / "pending").mkdir()
    (spool / "failed").mkdir()
    (spool / "pending" / "00000002.json").write_text(json.dumps(
        {"kind": "artifact", "path": str(table), "artifact_dir": "per_sample_losses/test"}))
    (spool / "pending" / "00000003.json").write_text(json.dumps(
        {"kind": "artifact", "path": str(media), "artifact_dir": "per_sample_media/test"}))
    (spool / "failed" / "00000001.json").write_text(json.dumps({"kind": "metrics", "metrics": {}, "step": 0}))
    (spool / "pending" / "00000004.json").write_text("{truncated")
    assert [op["kind"] for op in chaos.operations(spool)] == ["metrics", "artifact", "artifact"]
    assert chaos.queued_tables(spool) == {
        "per_sample_losses/test/epoch_0001.parquet": hashlib.sha256(table.read_bytes()).hexdigest()}
    assert chaos.queued_tables(None) == {}
    assert chaos.bytes_under(spool) == sum(f.stat().st_size for f in spool.rglob("*") if f.is_file()) > 0


def test_report_lines():
    figures = {
        "faults": 3, "faults_by_kind": {"server": 1, "train mid-epoch": 2}, "trainings": 1,
        "trainings_by_kind": {"loop": 1}, "epochs": 3, "attempts": {"train": 3, "job": 1},
        "tables_expected": 8, "tables_expected_in_runs": 6, "queued_at_kill_expected": 2,
        "queued_at_kill_arrived": 2, "tables_arrived": 8, "tables_lost": 0, "tables_duplicated": 0,
        "wrongly_done": [], "hangs": ["loop-00 job attempt 1: past 120 s, killed"],
        "problems": [], "failures_without_fault": [], "spool_bytes_left": 1234, "spool_operations_left": 0,
        "temp_bytes_left": 0, "wall_s": 61.2, "server_down_s": 7.0, "cpus": 2, "loadavg_1_5_15": [1.0, 2.0, 3.0],
        "command": "python bench/chaos.py --faults 3", "hang_s": 120.0, "longest_s": {"job": 31.4, "loop": 88.6},
        "settings": {"ACTION_SCORES_UPLOAD_WAIT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"},
    }
    text = chaos.report(figures)
    assert "| faults | 3 faults (1 server, 2 train mid-epoch) |" in text
    assert "| lost | 0 tables lost |" in text
    assert "| hangs | 1 hangs (a process past 120 s); longest process that ended itself: job 31 s, loop 89 s |" in text
    assert "| settings | ACTION_SCORES_UPLOAD_WAIT=30, MLFLOW_HTTP_REQUEST_MAX_RETRIES=3 |" in text
    assert "Hangs:\n- loop-00 job attempt 1: past 120 s, killed" in text
    assert "1,234 spool bytes left" in text and "2 CPU cores" in text
    assert text.startswith("`python bench/chaos.py --faults 3`")


def test_last_line_of_a_log(tmp_path):
    log = tmp_path / "x.log"
    assert chaos.last_line(log) == "(nothing printed)"
    log.write_text("epoch 0\n" + "Retrying (Retry(total=2)) " + "x" * 300 + "\n\n")
    assert chaos.last_line(log) == ("Retrying (Retry(total=2)) " + "x" * 300)[:200]


class _Always:
    """An RNG whose every draw chooses to upload first."""

    def random(self) -> float:
        return 0.0


def test_a_spool_without_its_run_file_is_resumed_not_uploaded(tmp_path):
    bench = object.__new__(chaos.Bench)
    bench.rng = _Always()
    training = chaos.Training("loop-00", "loop", "e", tmp_path / "spool")
    (training.spool_root / "mlflow-abc" / "per_sample_media").mkdir(parents=True)  # killed before its first write
    bench.after_kill(training, "train")
    assert (training.step, training.after_find) == ("find", "train")
    (training.spool_root / "mlflow-abc" / "run.json").write_text("{}")
    bench.after_kill(training, "train")
    assert (training.step, training.after_find) == ("find", "upload")
