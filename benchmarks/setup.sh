#!/usr/bin/env bash
# Install the benchmark-only packages into .venv (the project's main environment).
#
#   benchmarks/setup.sh            # peer sampler + py-spy
#   WITH_LLAMA_CPP=1 benchmarks/setup.sh   # also build llama-cpp-python (compiles llama.cpp:
#                                          # ~10 minutes of every core; the generation
#                                          # benchmark skips its llama.cpp row without it)
#
# self-rewarding-lm-pytorch==0.2.12 is the peer implementation whose sampler
# (self_rewarding_lm_pytorch.sampling_utils.sample) benchmarks/generation.py compares against.
# Its metadata requires torch>=2.0, accelerate, beartype, einops, einx, ema-pytorch, numpy,
# pytorch-custom-utils, torchtyping, tqdm and Jinja2; the package __init__ imports its trainers
# and with them all of those. The benchmark loads only sampling_utils.py (by file, without the
# package __init__), which imports torch, beartype and einops. So: the package with --no-deps,
# plus beartype and einops, all under scripts/constraints.txt so torch stays the CPU build 2.13.0.
# py-spy is the sampling profiler used for the profiler evidence in docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT="$PWD/scripts/constraints.txt"

"$PY" -m pip install --quiet --no-deps "self-rewarding-lm-pytorch==0.2.12"
"$PY" -m pip install --quiet "beartype>=0.18" "einops>=0.7.0" "py-spy>=0.3.14"
if [ "${WITH_LLAMA_CPP:-0}" = "1" ]; then
  CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON"} "$PY" -m pip install --quiet "llama-cpp-python>=0.3"
fi

"$PY" - <<'PY'
import importlib.util, pathlib, torch
spec = importlib.util.find_spec("self_rewarding_lm_pytorch")
path = pathlib.Path(spec.origin).parent / "sampling_utils.py"
mod_spec = importlib.util.spec_from_file_location("sr_sampling_utils", path)
mod = importlib.util.module_from_spec(mod_spec)
mod_spec.loader.exec_module(mod)
assert callable(mod.sample)
print(f"ok: peer sampler at {path}; torch {torch.__version__}")
PY
