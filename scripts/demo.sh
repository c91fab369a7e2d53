#!/usr/bin/env bash
# Set up .venv, train the paper's classifier on scikit-learn's digits with `mlflow run`,
# analyse the run, and say where the panels are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh torch
export PATH="$PWD/.venv/bin:$PATH"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"
experiment="${EXPERIMENT:-action-scores-demo}"
log=$(mktemp)
mlflow run . -e classify --env-manager local --experiment-name "$experiment" 2>&1 | tee "$log"
run_id=$(grep -o "Run (ID '[0-9a-f]*') succeeded" "$log" | tail -1 | grep -o "[0-9a-f]\{32\}")
mlflow run . -e analyze --env-manager local --experiment-name "$experiment" -P run_id="$run_id"
cat <<MSG

Trained and analysed run $run_id (experiment '$experiment', tracking URI $MLFLOW_TRACKING_URI).
Open the panels:  mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI
  then experiment '$experiment' > the classify run > Artifacts > action_scores/test/loss/hardest.png
MSG
