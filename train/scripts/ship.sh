#!/usr/bin/env bash
# The shipped models and the method comparison, as three GPU commands of under 10 minutes each on one
# machine (the run folders under $RUNS must survive between them):
#   bash train/scripts/ship.sh base       collect + autoencoder + teacher + AR teachers, both worlds at once
#   bash train/scripts/ship.sh distill    CF++ (both worlds) and the comparison rows (procedural), at once
#   bash train/scripts/ship.sh evaluate   every evaluation, one at a time
# Both worlds (and the comparison chains) train side by side on one GPU: each stage alone leaves most of
# it idle. What comes back lands in $OUT: the shipped fp16 shards, results-WORLD.tgz (reports, logs).
set -uo pipefail
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUNS=${RUNS:-/tmp/runs}
FINAL=${OUT:-out}
export OUT=/tmp/pipeline_out
mkdir -p "$FINAL" "$OUT"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
both() {  # both PHASE...: the procedural pipeline (with the comparison) and Doom's, side by side
  COMPARE=1 bash train/scripts/pipeline.sh procedural "$@" >"$OUT/procedural.txt" 2>&1 &
  local p=$!
  WORKERS=${DOOM_WORKERS:-4} COLLECTORS=4 bash train/scripts/pipeline.sh doom "$@" >"$OUT/doom.txt" 2>&1
  local d=$?
  wait $p
  local q=$?
  cat "$OUT/procedural.txt" "$OUT/doom.txt"
  return $((q | d))
}
evaluate() {  # the shipped rows of both worlds first
  local world
  for world in procedural doom; do EVAL_ROWS=cf_pp_2step bash train/scripts/pipeline.sh "$world" evaluate || return 1; done
  for world in procedural doom; do bash train/scripts/pipeline.sh "$world" evaluate || return 1; done
}
export -f both evaluate
case ${1:-} in
  base) timeout "${LIMIT:-560}" bash -c "both data base" ;;
  distill) WORKERS=3 timeout "${LIMIT:-560}" bash -c "both distill" ;;
  evaluate) timeout "${LIMIT:-560}" bash -c evaluate ;;
  *) echo "usage: ship.sh base | distill | evaluate" >&2; exit 2 ;;
esac
status=$?
for world in procedural doom; do
  bash train/scripts/pipeline.sh "$world" pack
  cp "$OUT/$world/results.tgz" "$FINAL/results-$world.tgz"
  cp "$OUT/$world/$world"*.safetensors "$FINAL/" 2>/dev/null
done
ls "$RUNS"/*/*/tensorboard 2>/dev/null | head -2
exit $status
