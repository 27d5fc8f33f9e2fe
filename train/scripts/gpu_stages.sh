#!/usr/bin/env bash
# One GPU call of train/gpu_smoke.sh (MODE = stages | ddp, default stages) at the default preset, sized to
# finish within a 10-minute command. Wheels in .whl/ (omegaconf) are installed first when present.
set -o pipefail
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
SMOKE_SECONDS=${SMOKE_SECONDS:-35} SMOKE_DISTILL_STEPS=${SMOKE_DISTILL_STEPS:-150} SMOKE_ODE_BATCHES=${SMOKE_ODE_BATCHES:-40} \
  bash train/gpu_smoke.sh "${1:-stages}" /tmp/smoke 2>&1 | grep -v -E "it/s\]|s/it\]|frame/s\]" | tee "$OUT/gpu_${1:-stages}.log" | tail -40
