#!/usr/bin/env bash
# Render a run's HTML report in headless Chromium and save a full-page PNG screenshot.
#
#   scripts/screenshot_report.sh RUN_DIR [OUT_PNG]
#
# Builds RUN_DIR/report/index.html first when it is missing or older than the run's
# manifest.json (set REBUILD=1 to always rebuild). OUT_PNG defaults to
# RUN_DIR/report/screenshot.png. Environment:
#   CHROMIUM   the browser binary (default: chromium, chromium-browser or google-chrome on PATH)
#   WIDTH      window width in pixels (default 1400)
#   HEIGHT     window height in pixels (default 3000; the screenshot is the window, not the page)
#   PYTHON     the Python that has selfalign (default: .venv/bin/python of this checkout, else python3)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi

run_dir=$1
if [[ ! -f "$run_dir/manifest.json" ]]; then
  echo "error: $run_dir is not a selfalign run directory (no manifest.json)" >&2
  exit 2
fi
run_dir=$(cd "$run_dir" && pwd)
out_png=${2:-$run_dir/report/screenshot.png}
mkdir -p "$(dirname "$out_png")"
out_png=$(cd "$(dirname "$out_png")" && pwd)/$(basename "$out_png")

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-}
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python=$here/.venv/bin/python; else python=python3; fi
fi

index=$run_dir/report/index.html
if [[ "${REBUILD:-0}" == 1 || ! -f "$index" || "$run_dir/manifest.json" -nt "$index" ]]; then
  echo "building the report of $run_dir" >&2
  "$python" -c 'import sys; from pathlib import Path; from selfalign.report.html import write_report; print(write_report(Path(sys.argv[1])))' "$run_dir" >&2
fi

browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser=$b; break; fi
  done
fi
if [[ -z "$browser" ]]; then
  echo "error: no chromium found (install it with: apt-get install chromium, or set CHROMIUM=/path/to/browser)" >&2
  exit 3
fi

# a throwaway profile, so a running browser or a locked profile never interferes
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
rm -f "$out_png"
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
  --user-data-dir="$profile" --window-size="${WIDTH:-1400},${HEIGHT:-3000}" \
  --screenshot="$out_png" "file://$index" >"$profile/chromium.log" 2>&1 || {
    echo "error: $browser failed; its output:" >&2
    cat "$profile/chromium.log" >&2
    exit 1
  }
if [[ ! -s "$out_png" ]]; then
  echo "error: $browser wrote no screenshot; its output:" >&2
  cat "$profile/chromium.log" >&2
  exit 1
fi
echo "$out_png"
