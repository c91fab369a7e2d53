"""What a user sees in the MLflow UI: screenshots of a real `mlflow server` in headless Chromium at 1600x1000.

    apt-get install -y chromium                      # Debian's package; nothing downloads a browser
    python bench/ui_screenshot.py --out /tmp/ui-shots/after

Starts an `mlflow server` on 127.0.0.1 (sqlite, served artifacts in a temp dir, as the tests
do), trains the digits demo (`experiments.classify`, a few epochs) into a new experiment,
runs `action-scores analyze` on it, then saves, under --out:
- `artifact.png`: the run's artifact `action_scores/test/loss/hardest.png` in the artifact pane
  (`#/experiments/<id>/runs/<run>/artifacts/<path>`, the UI's `getRunPageRoute`);
- `experiment.png`: the experiment's page as it opens by default (GenAI or model-training view);
- `experiment-ml.png`: the same page with `?workflowType=machine_learning`;
- `hardest.png`: the panel itself, for comparison.
Run it with PYTHONPATH pointing at another checkout to shoot that version (e.g. the layout before).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("PYTHONPATH", str(ROOT)).split(os.pathsep)[0]).resolve()  # the checkout being shot
sys.path.insert(0, str(CODE))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests.conftest import local_mlflow_server  # noqa: E402

PANEL = "action_scores/test/loss/hardest.png"
WINDOW = "1600,1000"


def screenshot(url: str, path: Path, profile: Path, wait_ms: int) -> None:
    """One headless Chromium screenshot of `url` at WINDOW, after `wait_ms` of virtual time for the UI to load."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui_screenshot: no chromium; install Debian's package: apt-get install -y chromium")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--window-size={WINDOW}", f"--virtual-time-budget={wait_ms}",
                    f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/ui-shots/current", help="folder for the PNGs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--wait-ms", type=int, default=20000, help="virtual time the UI gets to load")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="ui-shot-") as work, local_mlflow_server(Path(work)) as uri:
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(CODE))
        env.pop("MLFLOW_RUN_ID", None)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "experiments.classify", "--dataset", "digits", "--epochs",
                        str(args.epochs), "--experiment", "ui-demo"], env=env, cwd=CODE, check=True)
        subprocess.run([sys.executable, "-m", "tracking.cli", "analyze", "--experiment", "ui-demo"], env=env,
                       cwd=CODE, check=True)
        print(f"trained and analysed in {time.perf_counter() - started:.0f} s")
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("ui-demo")
        run = client.search_runs([experiment.experiment_id])[0]
        print(f"experiment tags: {experiment.tags}")
        shutil.copy(client.download_artifacts(run.info.run_id, PANEL, work), out / "hardest.png")
        base = f"{uri}/#/experiments/{experiment.experiment_id}"
        shots = {
            "artifact.png": f"{base}/runs/{run.info.run_id}/artifacts/{PANEL}",
            "experiment.png": base,
            "experiment-ml.png": f"{base}?workflowType=machine_learning",
        }
        for name, url in shots.items():
            screenshot(url, out / name, Path(work) / f"profile-{name}", args.wait_ms)  # a fresh profile each
            print(f"{out / name}: {url}")
    from PIL import Image

    with Image.open(out / "hardest.png") as panel:
        print(f"panel {PANEL}: {panel.size[0]}x{panel.size[1]} px")


if __name__ == "__main__":
    main()
