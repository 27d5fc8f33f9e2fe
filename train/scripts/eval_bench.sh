#!/usr/bin/env bash
# Wall time of a full evaluation report (train.evaluate at its default protocol: 16 held-out clips of 128
# steps, 4 rollouts of 2,000 frames, swap test, IDM scores, speed) of a student and of an AR teacher.
# On the GPU machine, from the repo root:
#
#   bash train/scripts/eval_bench.sh        # DEVICE (cuda), OUT (/tmp/eval_bench), EVAL (more train.evaluate arguments)
#
# The student is the shipped procedural model (2 steps). The AR teacher is the same weights with the sampler
# an ar_teacher checkpoint of pipeline.sh exports (guided Euler, sample.steps=16, CFG and shift of
# train/configs/ar_teacher.yaml: 33 network evaluations a frame); the time does not depend on the weights.
# Wheels in .whl/ are installed first when present (the GPU image lacks omegaconf).
set -euo pipefail
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/eval_bench}
DEVICE=${DEVICE:-cuda}
STUDENT=assets/models/procedural.safetensors
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null || true
python3 - "$STUDENT" "$OUT/ar_teacher.safetensors" <<'PY'
import sys

from train.inputs import rebuilt, teacher_sampler, with_sampler
from train.config import compose
from worldmodel.checkpoint import load, save

student = load(sys.argv[1])
cfg = with_sampler(student.config, teacher_sampler(compose("ar_teacher", ["sample.steps=16"])[0].sample))
cfg.stage = "ar_teacher"
save(sys.argv[2], rebuilt(cfg, student))
PY
for row in "student $STUDENT" "ar_teacher $OUT/ar_teacher.safetensors"; do
  read -r name checkpoint <<<"$row"
  start=$(date +%s%N)
  # shellcheck disable=SC2086
  if ! python3 -m train.evaluate "$checkpoint" --world procedural --out "$OUT/$name" --device "$DEVICE" ${EVAL:-} \
      >"$OUT/$name.log" 2>&1; then
    tail -5 "$OUT/$name.log"
    exit 1
  fi
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  printf '%s: full report in %d.%d s (%s)\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$OUT/$name/report.md"
done
