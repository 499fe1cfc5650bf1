#!/usr/bin/env bash
# Download, on a machine with network access, the wheels tools/gpu_check.sh installs on a GPU
# machine that has none: the service's packages that the target GPU image lacks (listed in
# tools/gpu_wheels.txt, CPython 3.12, manylinux x86_64), with their dependencies, into .gpu-wheels/
# (git-ignored; it travels with the checkout, and gpu_check.sh installs from it with --no-index).
#
#   tools/prefetch_gpu_wheels.sh [--dir DIR] [--with-av]
#
# av (PyAV, ~35 MB) is only for `bisenet stream` on video files, which the check does not run:
# it is left out unless --with-av, to keep the folder small enough to travel.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.gpu-wheels
PACKAGES=(-r tools/gpu_wheels.txt)
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR=$2; shift 2 ;;
    --with-av) PACKAGES+=("av>=12"); shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "prefetch_gpu_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$DIR"
PLATFORMS=()
for p in manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR" "${PACKAGES[@]}"
# The GPU image has these already (and its own torch stack): do not carry or reinstall them.
for name in numpy idna anyio sniffio h11 click certifi; do
  rm -f "$DIR"/"$name"-*.whl
done
echo "prefetch_gpu_wheels.sh: $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR"
