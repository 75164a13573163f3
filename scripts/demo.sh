#!/usr/bin/env bash
# The main job on the embedded default model (sets up .venv first if needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/selfalign run "$@"
