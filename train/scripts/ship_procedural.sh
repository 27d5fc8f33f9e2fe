#!/usr/bin/env bash
# The whole pipeline for the procedural world in one GPU command (about 9 minutes on one H200):
# collect episodes, then autoencoder -> bidirectional teacher -> AR teacher -> causal CD -> DMD,
# each stage under a time budget, then export the 2-step frame-wise student as fp16 shards.
#   bash train/scripts/ship_procedural.sh [OUT_DIR]      (stage budgets: AE_S TEACHER_S AR_S CD_S DMD_S)
# Every stage resumes from its newest checkpoint when run again with the same run directory.
set -euo pipefail
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${1:-${OUT:-out/ship}}
RUNS=${RUNS:-/tmp/ship_runs}
mkdir -p "$OUT" "$RUNS"
DATA=$RUNS/episodes
[ -d "$DATA" ] || python3 -m worldmodel.data collect --world procedural --episodes ${EPISODES:-384} --frames ${FRAMES:-120} \
  --batch 128 --device cuda --out "$DATA" 2>&1 | tail -1
COMMON=(preset=default data.source=recordings "data.recordings=$DATA" data.workers=8 run.sample_every=0
        run.log_every=50 run.checkpoint_every=100000 run.steps=1000000 optim.warmup_steps=200)
stage() { local name=$1 seconds=$2; shift 2
  python3 -m train "$name" "${COMMON[@]}" "run.dir=$RUNS/$name" "run.time_limit_s=$seconds" "$@" 2>&1 \
    | grep -v -E "it/s\]|s/it\]|rms_norm" | tail -2; }
stage autoencoder "${AE_S:-70}" optim.lr=3e-4
stage teacher "${TEACHER_S:-150}" optim.lr=3e-4 "init.autoencoder=$RUNS/autoencoder/model.safetensors"
stage ar_teacher "${AR_S:-90}" "init.teacher=$RUNS/teacher/model.safetensors"
export_student() {  # export_student RUN: the run's model as fp16 shards in $OUT, with the stage logs
  for run in autoencoder teacher ar_teacher causal_cd dmd; do
    [ -f "$RUNS/$run/log.jsonl" ] && tail -1 "$RUNS/$run/log.jsonl" | python3 -c "import json,sys; r=json.load(sys.stdin); print('$run', {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})"
  done > "$OUT/stages.txt"
  python3 - "$RUNS/$1/model.safetensors" "$OUT/$MODEL_NAME.safetensors" <<'PY'
import sys, torch
from worldmodel import checkpoint
model = checkpoint.load(sys.argv[1])
for f in checkpoint.save(sys.argv[2], model, dtype=torch.float16, max_shard_mib=15):
    print("wrote", f, f.stat().st_size // 2**20, "MiB")
PY
}
MODEL_NAME=${MODEL_NAME:-procedural}
stage causal_cd "${CD_S:-70}" "init.teacher=$RUNS/ar_teacher/model.safetensors"
export_student causal_cd  # a usable 2-step student even if the DMD stage does not finish in time
stage dmd "${DMD_S:-90}" "init.student=$RUNS/causal_cd/model.safetensors" "init.teacher=$RUNS/teacher/model.safetensors"
export_student dmd
cat "$OUT/stages.txt"
