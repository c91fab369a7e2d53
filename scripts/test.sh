#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (starts its own MLflow server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"
unset MLFLOW_TRACKING_URI MLFLOW_RUN_ID
exec .venv/bin/python -m pytest "$@"
