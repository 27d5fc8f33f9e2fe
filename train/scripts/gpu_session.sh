#!/usr/bin/env bash
# One GPU lease, started in the background so that it outlives the 10-minute device command:
#   setsid nohup bash train/scripts/gpu_session.sh > /tmp/session.log 2>&1 &
# then poll /tmp/session/status with short commands, and copy /tmp/session/out/* to $OUT at the end.
# It runs: procedural data -> the recipe ablation (pipeline.sh ablate) -> its evaluation -> the training
# benchmark (before/after, alone on the GPU). Wheels missing on the GPU image (omegaconf) come from .whl/.
set -uo pipefail
S=${S:-/tmp/session}
mkdir -p "$S/out"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUNS=$S/runs OUT=$S/pipeline
note() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$S/status"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$S/status"
P=train/scripts/pipeline.sh

note "data"
bash $P procedural data > "$S/out/data.txt" 2>&1 || note "data failed"
note "ablate"
AE_S=${AE_S:-100} TEACHER_S=${TEACHER_S:-200} AR_S=${AR_S:-120} CD_S=${CD_S:-100} \
  bash $P procedural ablate > "$S/out/ablate.txt" 2>&1 || note "ablate failed"
note "evaluate"
# the AR teachers' guided Euler (33 forwards a frame) needs shorter stability rollouts to fit the lease
EVAL=${EVAL:---long-frames 400 --long-clips 2 --window 100} EVAL_ROWS=ablation EVAL_PARALLEL=1 bash $P procedural evaluate pack > "$S/out/evaluate.txt" 2>&1 || note "evaluate failed"
cp "$OUT/procedural/results.tgz" "$S/out/results-ablation.tgz" 2>/dev/null
for run in ar_shift1_ctx cd_shift1_ctx; do  # the candidates to ship, as fp16 shards (<= 15 MiB each)
  python3 - "$RUNS/procedural/$run/model.safetensors" "$S/out/$run.safetensors" <<'PY' || note "export $run failed"
import sys, torch
from worldmodel import checkpoint
checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=torch.float16, max_shard_mib=15)
PY
done
note "bench"
if [ -f train/bench.py ]; then
  timeout "${BENCH_S:-420}" python3 -m train.bench --stages teacher,ar_teacher,causal_cd,dmd --preset default \
    --batches 32,128 --variants before,after --window 15 --device cuda --data "$RUNS/procedural/episodes" \
    --out "$S/out/bench.json" > "$S/out/bench.txt" 2>&1 || note "bench stopped ($?)"
fi
note "done"
