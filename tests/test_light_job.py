"""The post-hoc job is a light install: no torch, torchvision or scikit-learn to import or run it.

Torch is the `[torch]` extra (recording and the experiments). These tests run the job in a child
process whose import system refuses torch, as an install without it would, so a stray
`import torch` anywhere on the job's path fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import ROOT
from tracking import contract

HEAVY = ("torch", "torchvision", "sklearn")
# Imported only by the job's parts that need them: panels, the duckdb engine, W&B runs, images.
ON_DEMAND = ("torch", "matplotlib", "duckdb", "wandb", "PIL")
# Installed first in the child: any import of a heavy package raises as if it were not installed.
BLOCK_HEAVY = textwrap.dedent(f"""
    import sys
    class _NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the light install has none)")
            return None
    sys.meta_path.insert(0, _NotInstalled())
""")


def _child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with the heavy packages blocked."""
    environment = dict(env or os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", BLOCK_HEAVY + textwrap.dedent(code)], capture_output=True,
                          text=True, env=environment, cwd=ROOT, timeout=300)


def test_import_and_help_load_no_heavy_package() -> None:
    result = _child("""
        import json, sys
        import tracking, tracking.cli, tracking.analyze, tracking.compare
        try:
            tracking.cli.main(["--help"])
        except SystemExit:
            pass
        print(json.dumps(sorted(m for m in ("torch", "mlflow", "wandb", "matplotlib", "duckdb") if m in sys.modules)))
    """)
    assert result.returncode == 0, result.stderr
    assert "usage: action-scores" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []  # nothing heavy, not even the trackers


def test_recorder_names_the_extra_it_needs() -> None:
    result = _child("from tracking import LossRecorder")
    assert result.returncode != 0
    assert "No module named 'torch'" in result.stderr


def _write_run(client, experiment_id: str, tables: list[pd.DataFrame], work: Path) -> str:
    """A run whose per-epoch tables were written by another client (pyarrow defaults), no dataset param."""
    run = client.create_run(experiment_id)
    folder = work / "tables"
    folder.mkdir()
    for epoch, table in enumerate(tables):
        path = folder / contract.epoch_file_name(epoch)
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
        client.log_artifact(run.info.run_id, str(path), contract.losses_dir("test"))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_the_job_scores_a_run_without_torch(client, experiment_id: str, mlflow_server: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    ids = np.arange(50, dtype=np.int64)
    tables = [pd.DataFrame({"sample_id": ids, "loss": rng.random(50).astype(np.float32)}) for _ in range(3)]
    run_id = _write_run(client, experiment_id, tables, tmp_path)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    env.pop("MLFLOW_RUN_ID", None)
    result = _child(f"""
        import json, sys
        from tracking.cli import main
        code = main(["analyze", "--run-id", "{run_id}"])
        print(json.dumps(sorted(m for m in {ON_DEMAND!r} if m in sys.modules)))
        sys.exit(code)
    """, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run {run_id}: done" in result.stdout
    # A run without pictures, scored by the default engine on MLflow: nothing it does not use is imported.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    local = client.download_artifacts(run_id, f"{contract.scores_dir('test')}/{contract.SCORES_FILE}", str(tmp_path))
    scores = pd.read_parquet(local).set_index("sample_id")
    expected = sum(table.set_index("sample_id")["loss"].astype(np.float64) for table in tables)
    np.testing.assert_allclose(scores["action"].to_numpy(), expected.loc[scores.index].to_numpy(), rtol=1e-6)
    assert client.get_run(run_id).data.tags[contract.STATUS_TAG] == contract.STATUS_DONE
