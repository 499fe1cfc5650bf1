#!/usr/bin/env bash
# One prepared GPU check: on one H100/H200 it runs in about 8 minutes and writes one markdown
# report with the GPU tests (the whole service on the GPU among them), the model benchmark at
# 1024x2048 (R18 and R50: eager fp32 batch 1 NCHW, each optimisation, CUDA graphs fp16 at batch
# 1/4/8/16, torch.compile), fp16/bf16/graph label agreement on photos, nvJPEG against Pillow, the
# memory of turning a 4096x4096 image's logits into labels, the service over REST and gRPC with
# 1024x2048 JPEGs (front-end and worker decoding), the 30 fps streams held with p99 under 33.3 ms,
# training images/s and peak memory at 4 x 1024x1024 per GPU, and last `--batching adaptive`
# beside the default.
#
#   tools/gpu_check.sh [--dry-run] [--report FILE] [--budget SECONDS] [--python PYTHON]
#
# --dry-run prints the steps (STEP<TAB>name<TAB>timeout<TAB>command) without running them.
# The machine needs no network: the packages the GPU image lacks are installed from
# .gpu-wheels/, which tools/prefetch_gpu_wheels.sh fills beforehand. Each step has its own
# timeout, cut to what is left of --budget seconds (default 450, at least 30 per step), and steps
# that would start after it are skipped: the whole run stays under 8 minutes. A failed step is
# reported and the next one runs. The report goes to --report (default
# $OUT/gpu_check_report.md when $OUT is set, else ./gpu_check_report.md).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DRY_RUN=0
BUDGET=450
PY=${PYTHON:-python3}
REPORT=${OUT:+$OUT/}gpu_check_report.md
WHEELS=.gpu-wheels
WORK=${TMPDIR:-/tmp}/bisenet_gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --report) REPORT=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
BISENET="$PY -m service.cli"

SERVE="--model bisenetv1_r18=random --device cuda:0 --warm-shapes 1024x2048 --max-batch 8 --log-level warning"
LOAD="--device cuda --size 1024x2048 --format png --concurrency 1,8 --requests 4000 --seconds 8 --warmup 16"

NAMES=() TIMEOUTS=() COMMANDS=()
step() { NAMES+=("$1"); TIMEOUTS+=("$2"); COMMANDS+=("$3"); }

step environment 30 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && echo cpus \$(nproc), /dev/shm \$(df -h --output=avail /dev/shm | tail -1) free && $PY -c 'import sys, torch, torchvision; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torchvision.__version__, torch.cuda.get_device_name(0))'"
step install 120 "$PY -m pip install -q --no-index --find-links $WHEELS -r tools/gpu_wheels.txt"
step gpu-tests 180 "$PY -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_runtime.py tests/test_gpu_service.py"
step model-bench 240 "$BISENET bench model --device cuda --models bisenetv1_r18 bisenetv1_r50 --height 1024 --width 2048 --batches 1 4 8 16 --variants eager fold channels_last fp16 bf16 graphs batch engine --warmup 5 --iters 30 --max-seconds 2 --agreement"
step model-compile 150 "$BISENET bench model --device cuda --models bisenetv1_r18 --height 1024 --width 2048 --batches 1 --variants compile --warmup 5 --iters 30 --max-seconds 2"
# nvJPEG against Pillow on photos: pixel differences and label agreement (random weights: the
# machine cannot download the official ones), and decode time per image.
step decode-nvjpeg 60 "$BISENET bench decode --device cuda --model bisenetv1_r18 --weights random --size 1024x2048"
# Logits -> labels of one 4096x4096 image (the --max-pixels limit): all channels at once against
# the engine's channel groups (256 MB budget) and smaller ones; peak CUDA memory and time.
step labels-memory 45 "$PY tools/bench_labels.py --device cuda --size 4096x4096 --budgets 4096,256,64 --repeats 5"
for mode in frontend worker; do
  for protocol in rest grpc; do
    step "service-$protocol-decode-$mode" 90 "$BISENET bench service --spawn \"$SERVE --decode $mode\" $LOAD --protocol $protocol"
  done
done
decode=" --decode worker"
step streams-30fps 120 "$BISENET bench service --spawn \"$SERVE$decode\" --device cuda --size 1024x2048 --format json --concurrency '' --warmup 0 --streams 8 --capacity --max-streams 64 --seconds 6 --target-fps 30 --stream-send jpeg"
step train-data 60 "$PY tools/synthetic_train_data.py $WORK/cityscapes --count 16"
for arch in r18 r50; do
  step "train-$arch" 90 "$BISENET train --preset bisenetv1_${arch}_cityscapes --data $WORK/cityscapes --iters 30 --batch-size 4 --log-interval 10 --val-interval 0 --ckpt-interval 100000 --workers 8 --work-dir $WORK/train_$arch --no-tensorboard --device cuda"
done

# The batching policy that waits only while requests are on their way, beside the default (`wait`) rows
# above; last, so that it is the step a tight budget skips.
step service-grpc-batching-adaptive 75 "$BISENET bench service --spawn \"$SERVE$decode --batching adaptive\" ${LOAD/--seconds 8/--seconds 5} --protocol grpc"

if [ "$DRY_RUN" = 1 ]; then
  for i in "${!NAMES[@]}"; do
    printf 'STEP\t%s\t%s\t%s\n' "${NAMES[$i]}" "${TIMEOUTS[$i]}" "${COMMANDS[$i]}"
  done
  exit 0
fi

mkdir -p "$WORK" "$(dirname "$REPORT")"
START=$SECONDS
SUMMARY=""
BODY=""
for i in "${!NAMES[@]}"; do
  name=${NAMES[$i]}
  elapsed=$((SECONDS - START))
  if [ "$elapsed" -ge "$BUDGET" ]; then
    SUMMARY+="| $name | skipped (budget of ${BUDGET}s spent) | - |"$'\n'
    continue
  fi
  limit=${TIMEOUTS[$i]}
  left=$((BUDGET - elapsed))
  [ "$left" -lt 30 ] && left=30
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (${limit}s at most)" >&2
  t0=$SECONDS
  output=$(timeout --kill-after=10 "$limit" bash -c "${COMMANDS[$i]}" 2>&1)
  rc=$?
  status=ok
  [ $rc = 124 ] && status="timed out"
  [ $rc != 0 ] && [ $rc != 124 ] && status="failed (exit $rc)"
  SUMMARY+="| $name | $status | $((SECONDS - t0)) |"$'\n'
  echo "$output" | tail -n 5 >&2
  BODY+=$'\n'"## $name"$'\n\n'"\`${COMMANDS[$i]}\`"$'\n\n'
  if [[ "$name" == model-* ]]; then
    BODY+="$output"$'\n'  # already markdown tables
  else
    BODY+='```'$'\n'"$(echo "$output" | tail -n 150)"$'\n''```'$'\n'
  fi
done
{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "Device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); total $((SECONDS - START)) s."
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  printf '%s' "$SUMMARY"
  printf '%s\n' "$BODY"
} >"$REPORT"
echo "gpu_check.sh: report in $REPORT ($((SECONDS - START)) s)" >&2
