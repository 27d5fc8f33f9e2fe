#!/usr/bin/env bash
# The shipped models and the method comparison, each one GPU command of under 10 minutes that needs
# nothing from an earlier one:
#   bash train/scripts/ship.sh worlds    procedural and Doom side by side: data, autoencoder, teacher,
#                                        AR teacher, causal CD, DMD, evaluation of 4 rows each, speed
#   bash train/scripts/ship.sh compare   procedural: the comparison rows (AR teacher, Self-Forcing-style,
#                                        Causal Forcing, CF++ 2/1 step) on the same data and budgets, and
#                                        the evaluation of the shipped assets/models/procedural model
# Stages share one GPU side by side: each alone leaves most of it idle. What comes back lands in $OUT:
# the shipped fp16 shards (worlds) and results-NAME.tgz (reports and stage logs, for python -m train.compare).
set -uo pipefail
W=${WHEELS:-.whl}  # wheels missing on the GPU machine (omegaconf; vizdoom for Doom)
[ -d "$W" ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$W"/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUNS=${RUNS:-/tmp/runs}
FINAL=${OUT:-out}
export OUT=/tmp/pipeline_out
mkdir -p "$FINAL" "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
export P=train/scripts/pipeline.sh

worlds() {
  export EVAL_PARALLEL=1 EVAL_ROWS="cf_pp_2step ar_teacher causal_cd_2step cf_pp_1step"
  bash $P procedural data base distill evaluate >"$OUT/procedural.txt" 2>&1 &
  local p=$!
  COLLECTORS=2 EPISODES=${DOOM_EPISODES:-384} WORKERS=4 bash $P doom data base distill evaluate >"$OUT/doom.txt" 2>&1
  wait $p
  cat "$OUT/procedural.txt" "$OUT/doom.txt"
}

compare() {  # (and the shipped procedural model's own evaluation, alongside)
  OMP_NUM_THREADS=4 python3 -m train.evaluate assets/models/procedural.safetensors --world procedural \
    --out "$OUT/procedural/eval/shipped" --device cuda >"$OUT/eval-shipped.log" 2>&1 &
  COMPARE=1 EVAL_PARALLEL=1 WORKERS=4 bash $P procedural data base distill evaluate
  wait
}

case ${1:-} in
  worlds) export -f worlds; timeout "${LIMIT:-500}" bash -c worlds; NAMES="procedural doom" ;;
  compare) export -f compare; timeout "${LIMIT:-500}" bash -c compare; NAMES=procedural ;;
  *) echo "usage: ship.sh worlds | compare" >&2; exit 2 ;;
esac
status=$?
for world in $NAMES; do
  timeout "${SPEED_LIMIT:-30}" bash $P "$world" speed
  bash $P "$world" pack
  cp "$OUT/$world/results.tgz" "$FINAL/results-$1-$world.tgz"
  [ "$1" = worlds ] && cp "$OUT/$world/$world"*.safetensors "$FINAL/" 2>/dev/null
done
exit $status
