#!/usr/bin/env bash
# Build .venv-peers (or $1): the peers of `bisenet bench peers` that cannot share the main venv.
#   - nvidia-pytriton bundles a real Triton Inference Server but pins numpy < 2;
#   - tritonclient[all]==2.51.0 is installed without dependencies, only for its bin/perf_analyzer:
#     the newest perf_analyzer binary that runs on glibc 2.36. It needs libcudart (from
#     nvidia-cuda-runtime-cu12, found through LD_LIBRARY_PATH by service/bench/perf_analyzer.py) and
#     Debian's libb64-0d (apt, installed here when missing; needs root or sudo).
#   - the project itself, editable and without dependencies, plus what the engine and the tests need.
# Idempotent: a stamp file skips the work until this script changes (the project is installed
# editable and without dependencies, so edits to pyproject.toml need no rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-peers}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
if [ -z "${CONSTRAINTS+x}" ]; then
  # CPU machines pin the CPU torch wheel, as the Makefile does.
  if command -v nvidia-smi >/dev/null 2>&1; then CONSTRAINTS=""; else CONSTRAINTS="-c constraints-cpu.txt"; fi
fi

if ! dpkg -s libb64-0d >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "peers venv: installing Debian's libb64-0d for perf_analyzer" >&2
  APT="$SUDO apt-get -o DPkg::Lock::Timeout=600 -y -q"  # wait for another apt run instead of failing
  $APT install libb64-0d >/dev/null || { $APT update >/dev/null && $APT install libb64-0d >/dev/null; }
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$PY" -m pip install -q $CONSTRAINTS torch "numpy>=1.26,<2" "nvidia-pytriton>=0.7,<0.8" \
  "pillow>=10.0" "tqdm>=4.66" "httpx>=0.27" "scikit-image>=0.22" "pytest>=8" "pytest-timeout>=2.3" \
  "nvidia-cuda-runtime-cu12>=12.4,<13"
"$PY" -m pip install -q --no-deps "tritonclient[all]==2.51.0"
"$PY" -m pip install -q --no-deps -e .
"$PY" -c "import numpy, pytriton, torch, model; print('peers venv: pytriton', __import__('importlib.metadata').metadata.version('nvidia-pytriton'), 'numpy', numpy.__version__, 'torch', torch.__version__)"
test -x "$VENV/bin/perf_analyzer"
touch "$STAMP"
