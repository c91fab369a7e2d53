#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its pinned torch/torchvision/mlflow.
# Usage: bash scripts/setup.sh [extra]   e.g. `bash scripts/setup.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
[ -n "$extra" ] && spec=".[$extra]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
# The browse-page test drives Debian's chromium (no browser download); installed only when missing.
if [ "$extra" = "test" ] && ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium chromium-driver >/dev/null; }
fi
# Spark (`--engine spark`, the `spark` extra and the tests) runs on Java 17 or newer: Debian's headless JRE when missing.
if { [ "$extra" = "test" ] || [ "$extra" = "spark" ]; } && ! command -v java >/dev/null; then
  sudo=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; }; then
    $sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless >/dev/null \
      || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends openjdk-17-jre-headless >/dev/null; }
  else
    echo "Spark needs Java 17 or newer and 'java' is not on PATH: install it (Debian: apt-get install openjdk-17-jre-headless)" >&2
  fi
fi
