#!/usr/bin/env bash
# One GPU lease, started in the background so that it outlives the 10-minute device command:
#   setsid nohup bash train/scripts/gpu_session.sh > /tmp/session.log 2>&1 &
# then poll /tmp/session/status with short commands, and copy /tmp/session/out/* to $OUT at the end.
# It runs the procedural world's whole method on the stages' recipe: data -> autoencoder (going on from
# the shipped model's, AE_INIT) -> teacher -> AR teacher -> causal CD -> DMD, then evaluates the AR
# teacher, both students and the shipped model on the same held-out data, exports the students as fp16
# shards, and spends what is left of the lease (until DEADLINE_S after the start) on the training benchmark.
# Wheels missing on the GPU image (omegaconf) come from .whl/.
set -uo pipefail
START=$(date +%s)
S=${S:-/tmp/session}
mkdir -p "$S/out"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUNS=$S/runs OUT=$S/pipeline
note() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$S/status"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$S/status"
P=train/scripts/pipeline.sh
SHIPPED=${SHIPPED:-assets/models/procedural.safetensors}  # the shard set

note "data"
bash $P procedural data > "$S/out/data.txt" 2>&1 || note "data failed"
python3 -m worldmodel.data stats "$RUNS/procedural/episodes" --json "$S/out/motion.json" 2>&1 | grep -v "^procedural-" \
  > "$S/out/motion.txt"
note "base"
AE_INIT=${AE_INIT:-$SHIPPED} AE_S=${AE_S:-100} TEACHER_S=${TEACHER_S:-300} AR_S=${AR_S:-210} \
  bash $P procedural base > "$S/out/base.txt" 2>&1 || note "base failed"
note "distill"
CD_S=${CD_S:-120} DMD_S=${DMD_S:-120} OUT=$S/out bash $P procedural distill > "$S/out/distill.txt" 2>&1 || note "distill failed"
note "evaluate"
EVAL=${EVAL:---long-frames 400 --long-clips 2 --window 100}
# shellcheck disable=SC2086
OMP_NUM_THREADS=4 python3 -m train.evaluate "$SHIPPED" --world procedural --out "$OUT/procedural/eval/shipped" --device cuda \
  $EVAL > "$RUNS/procedural/eval-shipped.log" 2>&1 &
shipped=$!
EVAL_ROWS="cf_pp_2step causal_cd_2step ar_teacher" EVAL_PARALLEL=1 bash $P procedural evaluate > "$S/out/evaluate.txt" 2>&1 \
  || note "evaluate failed"
wait $shipped || note "shipped evaluation failed"
bash $P procedural pack >> "$S/out/evaluate.txt" 2>&1
cp "$OUT/procedural/results.tgz" "$S/out/results.tgz" 2>/dev/null
python3 - "$RUNS/procedural/causal_cd/model.safetensors" "$S/out/causal_cd.safetensors" <<'PY' || note "export causal_cd failed"
import sys, torch
from worldmodel import checkpoint
checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=torch.float16, max_shard_mib=15)
PY
left=$(( ${DEADLINE_S:-1560} - ($(date +%s) - START) ))
note "bench (${left}s left)"
if [ "$left" -gt 90 ]; then
  timeout "$left" python3 -m train.bench --stages teacher,ar_teacher,causal_cd,dmd --preset default \
    --batches 128 --variants after --window 10 --device cuda --data "$RUNS/procedural/episodes" \
    --out "$S/out/bench.json" > "$S/out/bench.txt" 2>&1 || note "bench stopped ($?)"
fi
note "done"
