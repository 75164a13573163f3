#!/usr/bin/env bash
# The whole test suite; this is what CI runs (.ci/run).
#   1. sets up .venv (scripts/setup.sh) and runs pytest there: every test, the slow ones included;
#   2. then the vllm engine's tests on vLLM (scripts/test_vllm.sh: sets up .venv-vllm, cached per
#      machine, and runs tests/test_engine_vllm.py with its python; in .venv its vLLM tests skip).
# Fails if either fails (both always run). Extra arguments go to step 1's pytest and skip step 2
# (e.g. scripts/test.sh tests/test_training.py -x); SELFALIGN_SKIP_VLLM=1 skips step 2 as well.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit $?
.venv/bin/python -m pytest "$@"
main=$?
if [ $# -gt 0 ] || [ "${SELFALIGN_SKIP_VLLM:-0}" = "1" ]; then
  why=$([ $# -gt 0 ] && echo "arguments were given" || echo "SELFALIGN_SKIP_VLLM=1")
  echo "scripts/test.sh: the vLLM tests (scripts/test_vllm.sh) were not run: $why" >&2
  exit $main
fi
bash scripts/test_vllm.sh
vllm=$?
if [ $main -ne 0 ] || [ $vllm -ne 0 ]; then
  echo "scripts/test.sh: failed (.venv suite: exit $main; vLLM tests: exit $vllm)" >&2
  exit $(( main != 0 ? main : vllm ))
fi
