#!/usr/bin/env bash
# One lease of A/B measurements on the shipped weights, started in the background like gpu_session.sh:
#   setsid nohup bash train/scripts/gpu_ab.sh > /tmp/ab.log 2>&1 < /dev/null &
# (carry .whl, from train/scripts/wheels.sh, and .bench_before.tgz: the files that differ, as in BASE, laid over a copy of
# this tree: `git archive BASE worldmodel/transformer.py train/bench.py | gzip > .bench_before.tgz`) then poll /tmp/ab/status for "] done" and copy /tmp/ab/out/* to $OUT. It runs:
#   1. the training benchmark (train.bench, variant "after": the fast path) at BENCH_BATCHES, for the code in
#      .bench_before.tgz (stages BENCH_BEFORE_STAGES, default BENCH_STAGES) and then for this tree (BENCH_STAGES), one
#      after the other, alone on the GPU (BENCH_STAGES= skips it), then with BENCH_AUTOTUNE_STAGES this tree again under
#      run.compile_mode=max-autotune-no-cudagraphs (bench_autotune); each bench is stopped after BENCH_TIMEOUT_S
#      seconds (default 280);
#   2. evaluations side by side of the shipped student and of its AR teacher (the carried DiT joined with the shipped
#      autoencoder; 16 Euler steps, CFG 1) with each KV cache of KV_CACHES ("default" is the checkpoint's; else
#      SINKS,WINDOW for train.evaluate --kv-cache; KV_CACHES= : none), on EVAL_CLIPS held-out clips of 128 frames drawn with EVAL_SEED.
# Results: out/bench_{before,after}.txt and .json, out/reports.tgz (each evaluation's report.md/json), out/texts.tgz.
set -uo pipefail
START=$(date +%s)
S=${S:-/tmp/ab}
mkdir -p "$S/out" "$S/text" "$S/eval"
note() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$S/status"; }
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import omegaconf" 2>/dev/null || { note "omegaconf is missing (carry .whl): nothing ran"; note "done"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$S/status"

BENCH_STAGES=${BENCH_STAGES-ar_teacher,causal_cd}
bench() {  # bench NAME STAGES [KEY=VALUE ...]: the training benchmark of the tree in the current folder, with those overrides
  timeout "${BENCH_TIMEOUT_S:-280}" python3 -m train.bench --preset default --window 10 --device cuda --data "$S/episodes" \
    --source synthetic --episodes 64 --stages "$2" --batches "${BENCH_BATCHES:-256}" --variants after \
    --out "$S/out/bench_$1.json" "${@:3}" > "$S/out/bench_$1.txt" 2>&1 || note "bench $1 stopped ($?)"
  note "bench $1: $(grep -E '^[a-z_]+ default batch' "$S/out/bench_$1.txt" | tr '\n' ';')"
}
if [ -n "$BENCH_STAGES" ]; then
  if [ -f .bench_before.tgz ]; then
    mkdir -p /tmp/before && cp -r worldmodel kernels train /tmp/before && tar xzf .bench_before.tgz -C /tmp/before
    (cd /tmp/before && PYTHONPATH=/tmp/site:/tmp/before bench before "${BENCH_BEFORE_STAGES:-$BENCH_STAGES}")
  fi
  bench after "$BENCH_STAGES"
  [ -n "${BENCH_AUTOTUNE_STAGES:-}" ] && bench autotune "$BENCH_AUTOTUNE_STAGES" run.compile_mode=max-autotune-no-cudagraphs
fi

[ -z "${KV_CACHES-default 0,12}" ] && { note "done"; exit 0; }  # KV_CACHES= : the benchmark alone
note "evaluate"
TEACHER=$S/ar_teacher.safetensors
python3 -m worldmodel.checkpoint join assets/models/procedural-ar-teacher.safetensors assets/models/procedural.safetensors \
  "$TEACHER" > "$S/text/join.txt" 2>&1 || note "joining the AR teacher failed"
for cache in ${KV_CACHES-default 0,12}; do
  flag=(); [ "$cache" != default ] && flag=(--kv-cache "$cache")
  for row in student:assets/models/procedural.safetensors ar_teacher:$TEACHER; do
    name=${row%%:*}_${cache/,/_} ckpt=${row#*:}
    ( s=$(date +%s)
      timeout "${EVAL_TIMEOUT_S:-420}" python3 -m train.evaluate "$ckpt" --world procedural --out "$S/eval/$name" --device cuda \
        --clips "${EVAL_CLIPS:-128}" --seed "${EVAL_SEED:-1}" --long-frames 200 --long-clips 1 --window 100 --speed-frames 10 \
        "${flag[@]}" > "$S/text/eval_$name.txt" 2>&1
      echo "$name rc=$? $(( $(date +%s) - s ))s" >> "$S/text/eval_times.txt" ) &
  done
done
wait
note "evaluated: $(tr '\n' ' ' < "$S/text/eval_times.txt")"
for r in "$S"/eval/*/report.json; do
  python3 - "$r" <<'PY' | tee -a "$S/status"
import json, sys
r = json.load(open(sys.argv[1]))
name = sys.argv[1].split("/")[-2]
swap = r["swap_test"]["model"]
print(f"{name}: swap {swap['pass_fraction']:.3f} by horizon {swap.get('by_horizon')}")
PY
done
tar czf "$S/out/reports.tgz" -C "$S/eval" $(cd "$S/eval" && find . -name 'report.*')
cp "$S/status" "$S/text/" && tar czf "$S/out/texts.tgz" -C "$S" text
note "done"
